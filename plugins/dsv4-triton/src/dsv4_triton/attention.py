"""The ``triton`` attention backend: the reference backend with Triton kernels for inference.

Plans, pool writes, long chunks (the dense path, ``dense_min_tokens`` new tokens or more) and every
autograd or batch-invariant path are the reference backend's (inherited, so their arithmetic is
identical). In inference (no autograd, not batch-invariant, no auxiliary loss) three steps read the
KV pool in place by slot (:mod:`dsv4_triton.ops.attention`):

- sink attention of every decode token and short prefill chunk over its window rows and selected
  compressed entries, and of every query of a long chunk in a ratio-4 layer;
- block compression of the blocks closing in the step, from their stored compressor rows (with fake
  quantisation the reference's arithmetic is kept);
- the lightning indexer's scores over each token's visible keys (top-k selection stays PyTorch's;
  a long chunk's queries, which share their keys, take the reference's streamed top-k).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dsv4.attention import ops as reference_ops
from dsv4.attention.reference import ReferenceAttentionBackend, ReferencePlan, _RatioPlan
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import AttentionLayer, CompressorParams
from dsv4_triton.device import refuse_device
from dsv4_triton.ops import attention as kernels

__all__ = ["TritonAttentionBackend"]


class TritonAttentionBackend(ReferenceAttentionBackend):
    """Reference attention plus Triton kernels reading the KV pool by slot (inference)."""

    name: ClassVar[str] = "triton"
    capabilities: ClassVar[frozenset[str]] = ReferenceAttentionBackend.capabilities - {"cpu"}

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """A CUDA device, or the CPU under Triton's interpreter."""
        return refuse_device(torch.device(device))

    def _attend_inference(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        sources: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor],
    ) -> torch.Tensor:
        # A store with no rows yet (no entry emitted anywhere) has every pick masked: nothing to read.
        parts = [(store, rows, mask) for (store, rows), mask in zip(sources, masks, strict=True) if store.shape[0]]
        return kernels.sink_attention(q, parts, layer.attn_sink, layer.softmax_scale)

    def _compress_entries(
        self, plan: ReferencePlan, rows: torch.Tensor, slots: torch.Tensor, rp: _RatioPlan, compressor: CompressorParams
    ) -> torch.Tensor:
        if plan.kernels.mode != "inference" or compressor.finish is not None:  # fake quantisation: the reference's
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
        # Keys shared by a long chunk's queries stream through the reference's blocks (no [T, N] scores).
        if training_objective or plan.kernels.mode != "inference" or rows.dim() != 2:
            return super()._indexer_topk(plan, q, weights, keys, rows, limit, topk, replay, training_objective)
        valid = torch.arange(rows.shape[1], device=rows.device) < limit.unsqueeze(1)
        index = kernels.index_scores(q, weights, keys, rows, valid)
        return reference_ops.select_topk(index, valid, topk, replay)
