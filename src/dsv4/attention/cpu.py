"""The ``cpu`` AttentionBackend: the reference backend with fused kernels for inference.

Plans, pool writes and every training or batch-invariant path are the reference backend's
(inherited, so the arithmetic there is identical). In inference (no autograd, not batch-invariant,
float32) three steps read the KV pool in place by slot instead of gathering rows into new tensors and
running small batched products over them (:mod:`dsv4.native.kernels`):

- sink attention (``sink_attention``): scores, the sink softmax and the weighted sum per token over
  its window rows and its selected (ratio 4) or visible (ratio 128) entries, for decode tokens and
  for every query of a long prefill chunk alike;
- the lightning indexer's top-k, streamed over the visible keys with a running top-k
  (``indexer_topk``), for decode tokens and for long prefill chunks whose queries share their keys
  (a token's scores are the same bits either way, so are its picks and their order);
- block compression of the blocks closing in the step (``compress_entries``; with fake
  quantisation the reference's arithmetic is kept).

So a long prefill costs O(W + k) attention per query plus the indexer's scoring of the visible keys,
with no [queries x context] tensor. Measured on the development machine (2 cores, batch 64, 8 heads of
128, 128 window rows + 64 entries per token, hot caches): decode attention 0.41 ms per layer vs 1.3 ms
for gather + products; a 64k-token prefill of benchmarks/bench_longctx.py's model 26-28 s (255 s with
the indexer's [chunk x entries] scores and dense masked attention over every entry).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from dsv4.attention.reference import ReferenceAttentionBackend, ReferencePlan, _DenseRequest, _RatioPlan
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import AttentionInputs, AttentionLayer, CompressorParams
from dsv4.native import kernels, unavailable_reason

__all__ = ["CpuAttentionBackend"]


class CpuAttentionBackend(ReferenceAttentionBackend):
    """Reference attention plus native CPU kernels that read the KV pool in place (float32 inference)."""

    name: ClassVar[str] = "cpu"
    capabilities: ClassVar[frozenset[str]] = ReferenceAttentionBackend.capabilities - {"cuda"}

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Needs the CPU, a head dim that is a multiple of 16 and the native kernels built."""
        if torch.device(device).type != "cpu":
            return f"runs on the CPU only, not {device}"
        if config.head_dim % 16:
            return f"head_dim {config.head_dim} is not a multiple of 16"
        return unavailable_reason()

    def _attend_inference(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        sources: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor],
    ) -> torch.Tensor:
        stores = [store for store, _ in sources]
        if not kernels.supports(q, *stores) or any(not s.is_contiguous() or s.dim() != 2 for s in stores):
            return super()._attend_inference(layer, q, sources, masks)
        # A store with no rows yet (no entry emitted anywhere) has every pick masked: nothing to read.
        parts = [(store, rows, mask) for (store, rows), mask in zip(sources, masks, strict=True) if store.shape[0]]
        return kernels.sink_attention(q, parts, layer.attn_sink, layer.softmax_scale)

    def _attend_dense_band(
        self,
        plan: ReferencePlan,
        d: _DenseRequest,
        layer: AttentionLayer,
        inputs: AttentionInputs,
        win: torch.Tensor,
        entries: torch.Tensor | None,
        ctx_slots: torch.Tensor,
        ent_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        # Each query reads its own window rows (and visible entries) in place: no masked product over the
        # band's block + W rows, no softmax over masked scores.
        stores = [win] if entries is None else [win, entries]
        if plan.kernels.mode != "inference" or inputs.aux is not None or not kernels.supports(inputs.q, *stores):
            return super()._attend_dense_band(plan, d, layer, inputs, win, entries, ctx_slots, ent_slots)
        outs = []
        for b0 in range(0, d.length, self.dense_block):
            b1 = min(d.length, b0 + self.dense_block)
            rows, valid = self._window_rows(d, b0, b1, ctx_slots)
            sources, masks = [(win, rows)], [valid]
            if entries is not None and ent_slots is not None and ent_slots.shape[0]:
                t = d.positions[b0:b1].unsqueeze(1)
                sources.append((entries, ent_slots.expand(b1 - b0, -1)))
                masks.append(torch.arange(ent_slots.shape[0]) < (t + 1) // layer.ratio)
            outs.append(self._attend_inference(layer, inputs.q[d.start + b0 : d.start + b1], sources, masks))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _compress_entries(
        self, plan: ReferencePlan, rows: torch.Tensor, slots: torch.Tensor, rp: _RatioPlan, compressor: CompressorParams
    ) -> torch.Tensor:
        if (
            plan.kernels.mode != "inference"
            or compressor.finish is not None  # fake quantisation: the reference's arithmetic
            or rows.dim() != 2
            or not rows.is_contiguous()
            or not kernels.supports(rows, compressor.ape, compressor.norm.weight)
        ):
            return super()._compress_entries(plan, rows, slots, rp, compressor)
        return kernels.compress_entries(
            rows, slots, rp.emit_valid, ape=compressor.ape, norm_weight=compressor.norm.weight,
            eps=compressor.norm.eps, cis=self._entry_rope(plan, rp, compressor), overlap=compressor.overlap,
        )

    def _indexer_topk(
        self,
        plan: ReferencePlan,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: torch.Tensor,
        rows: torch.Tensor,
        limit: torch.Tensor,
        topk: int,
        replay: torch.Tensor | None,
        training_objective: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = rows.shape[-1]
        if (
            training_objective
            or replay is not None
            or plan.kernels.mode != "inference"
            or keys.dim() != 2
            or keys.shape[0] == 0
            or n == 0
            or not keys.is_contiguous()
            or not kernels.supports(q, weights, keys)
        ):
            return super()._indexer_topk(plan, q, weights, keys, rows, limit, topk, replay, training_objective)
        top, scores = kernels.indexer_topk(q, weights.float(), keys, rows, limit, min(topk, n))
        return top, top < limit.unsqueeze(1), scores
