"""DeepSeek-V4 attention layers: projections here, the attention math in an AttentionBackend (spec §5).

Module and parameter names equal the checkpoint's (``wq_a``, ``wkv``, ``attn_sink``, ``compressor.ape``),
so weights load without renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsv4.attention.rope import rope_inv_freq
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import (
    AttentionBackend,
    AttentionInputs,
    CompressorInputs,
    IndexerInputs,
    KernelSet,
    RoutingTrace,
)
from dsv4.model.fused import FusedProjection
from dsv4.model.linear import Linear

__all__ = ["Attention", "Compressor", "Indexer", "RMSNorm", "StepContext"]


class RMSNorm(nn.Module):
    """``weight · x · rsqrt(mean(x²) + eps)`` in fp32 (weights are kept in fp32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, kernels: KernelSet) -> torch.Tensor:
        """Normalise the last dim of ``x``."""
        return kernels.rms_norm(x, self.weight, self.eps)


def _linear(n_in: int, n_out: int) -> Linear:
    return Linear(n_in, n_out)


@dataclass(slots=True)
class StepContext:
    """What every layer of one forward step shares: the batch plan and the rope tables."""

    kernels: KernelSet  # the hot ops of this step's mode
    backend: AttentionBackend
    metadata: Any
    positions: torch.Tensor  # [T]
    rope: dict[str, torch.Tensor]  # "main" / "compress" -> complex rotations [T, rd/2]
    aux: dict[str, list[torch.Tensor]] | None = None  # auxiliary losses the backend records, if asked
    routing: RoutingTrace | None = None  # expert / indexer choices to record or replay
    seq_index: torch.Tensor | None = None  # [T] the request of each row (per-sequence losses)
    num_seqs: int | None = None  # requests in the batch (seq_index.max() + 1, known on the host)
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> routed tokens [E]
    balance: list[torch.Tensor] | None = None  # the MoE layers' sequence-wise balance losses, if asked


class Compressor(nn.Module):
    """Pools every ``ratio`` tokens into one entry; overlapping (two half-series) for ratio-4 layers."""

    inv_freq: torch.Tensor

    def __init__(
        self,
        dim: int,
        head_dim: int,
        ratio: int,
        *,
        overlap: bool,
        eps: float,
        inv_freq: torch.Tensor,
        finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        coff = 2 if overlap else 1
        self.ratio, self.overlap, self.head_dim = ratio, overlap, head_dim
        self.wkv = _linear(dim, coff * head_dim)
        self.wgate = _linear(dim, coff * head_dim)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Applied to every emitted entry (fake quantisation), or None.
        self.finish: Callable[[torch.Tensor], torch.Tensor] | None = finish



class Indexer(nn.Module):
    """Lightning indexer of a ratio-4 layer: scores compressed entries, keeps the top-k (spec §5.2)."""

    def __init__(self, config: ModelConfig, ratio: int, inv_freq: torch.Tensor, fake_quant: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.wq_b = _linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = _linear(config.hidden_size, self.n_heads)
        finish = _fp4_rotated if fake_quant else None
        self.compressor = Compressor(
            config.hidden_size,
            self.head_dim,
            ratio,
            overlap=True,
            eps=config.rms_norm_eps,
            inv_freq=inv_freq,
            finish=finish,
        )
        self.finish: Callable[[torch.Tensor], torch.Tensor] | None = finish

    def forward(
        self, qr: torch.Tensor, weights: torch.Tensor, keys: CompressorInputs, cis: torch.Tensor, k: KernelSet
    ) -> IndexerInputs:
        """Indexer queries for the new tokens, with their (already projected) head weights and keys."""
        q = k.rope(self.wq_b(qr, k).view(-1, self.n_heads, self.head_dim), cis)
        if self.finish is not None:
            q = self.finish(q)
        return IndexerInputs(q=q, weights=weights.float() * self.n_heads**-0.5, keys=keys)


def _fp8_nope(rope_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from dsv4.checkpoint.quant import fake_quant_fp8

    def finish(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((fake_quant_fp8(x[..., :-rope_dim]), x[..., -rope_dim:]), dim=-1)

    return finish


def _fp4_rotated(x: torch.Tensor) -> torch.Tensor:
    from dsv4.checkpoint.quant import fake_quant_fp4, hadamard_rotate

    return fake_quant_fp4(hadamard_rotate(x))


def _check_fake_quant(config: ModelConfig) -> None:
    nope, ci = config.head_dim - config.qk_rope_head_dim, config.index_head_dim
    if nope % 64:
        raise ValueError(f"fake_quant needs head_dim - qk_rope_head_dim divisible by 64 (FP8 blocks), got {nope}")
    if ci % 32 or ci & (ci - 1):
        raise ValueError(f"fake_quant needs index_head_dim a power of two >= 32 (Hadamard + FP4 blocks), got {ci}")


class Attention(nn.Module):
    """One attention layer; ``ratio`` 0 (window only), 4 (overlapping compressor + indexer) or m (HCA)."""

    def __init__(self, config: ModelConfig, layer_id: int, ratio: int, *, fake_quant: bool = False) -> None:
        super().__init__()
        d, h, rd = config.head_dim, config.num_attention_heads, config.qk_rope_head_dim
        self.layer_id, self.ratio = layer_id, ratio
        self.n_heads, self.head_dim, self.rope_dim = h, d, rd
        self.o_groups = config.o_groups
        self.eps = config.rms_norm_eps
        self.softmax_scale = d**-0.5
        self.index_topk = config.index_topk
        self.rope_kind = "compress" if ratio else "main"
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.wq_a = _linear(config.hidden_size, config.q_lora_rank)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = _linear(config.q_lora_rank, h * d)
        self.wkv = _linear(config.hidden_size, d)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps)
        self.wo_a = _linear(h * d // config.o_groups, config.o_groups * config.o_lora_rank)
        self.wo_b = _linear(config.o_groups * config.o_lora_rank, config.hidden_size)
        if fake_quant:
            _check_fake_quant(config)
        self.kv_finish: Callable[[torch.Tensor], torch.Tensor] | None = _fp8_nope(rd) if fake_quant else None
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if ratio:
            inv_freq = rope_inv_freq(rd, config.compress_rope_theta, config.rope_scaling)
            csa = config.layer_types[layer_id] == "compressed_sparse_attention"
            self.compressor = Compressor(
                config.hidden_size, d, ratio, overlap=csa, eps=config.rms_norm_eps, inv_freq=inv_freq.clone(),
                finish=self.kv_finish,
            )
            if csa:
                self.indexer = Indexer(config, ratio, inv_freq.clone(), fake_quant)
        # The projections of the layer input x in one matmul: wq_a, wkv, then the compressor's
        # wkv/wgate; the indexer's (weights_proj, its compressor's wkv/wgate) in another, since it
        # reads a detached x.
        linears = [self.wq_a, self.wkv]
        if self.compressor is not None:
            linears += [self.compressor.wkv, self.compressor.wgate]
        self._project_x = FusedProjection(linears)
        self._project_index: FusedProjection | None = None
        if self.indexer is not None:
            ix = self.indexer
            self._project_index = FusedProjection([ix.weights_proj, ix.compressor.wkv, ix.compressor.wgate])

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``x [T, D]`` (normed sublayer input) -> ``[T, D]``."""
        k, t = ctx.kernels, x.shape[0]
        cis = ctx.rope[self.rope_kind]
        proj = self._project_x(x, k)
        qr = self.q_norm(proj[0], k)  # [T, q_lora]
        q = self.wq_b(qr, k).view(t, self.n_heads, self.head_dim)
        q = k.rope(k.rms_norm(q, None, self.eps), cis)  # per-head RMS, then rope
        kv = k.rope(self.kv_norm(proj[1], k), cis)  # [T, d]: K = V
        if self.kv_finish is not None:
            kv = self.kv_finish(kv)
        compressor = indexer = None
        if self.compressor is not None:
            compressor = CompressorInputs(kv=proj[2].float(), score=proj[3].float())
        if self.indexer is not None and self._project_index is not None:
            # The indexer only selects (top-k has no gradient); it learns from its own objective, so
            # its inputs are cut from the main graph as in DeepSeek-V3.2.
            weights, ikv, iscore = self._project_index(x.detach(), k)
            keys = CompressorInputs(kv=ikv.float(), score=iscore.float())
            indexer = self.indexer(qr.detach(), weights, keys, cis, k)
        inputs = AttentionInputs(q=q, kv=kv, compressor=compressor, indexer=indexer, aux=ctx.aux, routing=ctx.routing)
        o = ctx.backend.forward(self, inputs, ctx.metadata)  # [T, H, d]
        o = k.rope(o, cis, inverse=True)  # V carried rope: rotate back at the query position
        z = k.grouped_linear(o.reshape(t, self.o_groups, -1), self.wo_a)  # [T, g, o_lora]
        out: torch.Tensor = self.wo_b(z.flatten(1), k)
        return out
