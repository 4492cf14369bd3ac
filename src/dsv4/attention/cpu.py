"""The ``cpu`` AttentionBackend: the reference backend with fused kernels for inference.

Plans, pool writes, long-chunk (dense) attention and every training or batch-invariant path are the
reference backend's (inherited, so the arithmetic there is identical). In inference (no autograd,
not batch-invariant, float32) three steps read the KV pool in place by slot instead of gathering rows
into new tensors and running small batched products over them (:mod:`dsv4.native.kernels`):

- decode attention (``sink_attention``): scores, the sink softmax and the weighted sum per token
  over its window rows and selected entries;
- the lightning indexer's scores over the visible keys (``index_scores``; top-k stays PyTorch;
  both are skipped while every visible entry is picked);
- block compression of the blocks closing in the step (``compress_entries``; with fake
  quantisation the reference's arithmetic is kept).

Measured on the development machine (2 cores, batch 64, 8 heads of 128, 128 window rows + 64 entries
per token, hot caches): decode attention 0.41 ms per layer vs 1.3 ms for gather + products.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from dsv4.attention import ops
from dsv4.attention.reference import ReferenceAttentionBackend, ReferencePlan, _RatioPlan
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import AttentionLayer, CompressorParams
from dsv4.native import kernels, unavailable_reason

__all__ = ["CpuAttentionBackend"]


class CpuAttentionBackend(ReferenceAttentionBackend):
    """Reference attention plus native CPU decode kernels (float32 inference)."""

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
        valid: torch.Tensor,
        topk: int,
        replay: torch.Tensor | None,
        training_objective: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (
            training_objective
            or plan.kernels.mode != "inference"
            or keys.dim() != 2
            or keys.shape[0] == 0
            or keys.shape[1] % 16
            or not keys.is_contiguous()
            or not kernels.supports(q, weights, keys)
        ):
            return super()._indexer_topk(plan, q, weights, keys, rows, valid, topk, replay, training_objective)
        n = valid.shape[1]
        if topk >= n and replay is None:
            # Every visible entry is picked (contexts under topk · ratio tokens): attention over a set
            # does not depend on the order of its picks, so the scores need not be computed or sorted.
            # (Their values only feed the indexer's training objective, which is not computed here.)
            top = torch.arange(n, device=valid.device).expand(valid.shape[0], n)
            return top, valid, torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        index = kernels.index_scores(q, weights.float(), keys, rows, valid)
        return ops.select_topk(index, valid, topk, replay)
