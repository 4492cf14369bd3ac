"""DeepSeek-V4 mixture of experts: routing here, expert math in an ExpertExecutor (spec §6)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import ExpertExecutor, KernelSet
from dsv4.model.attention import StepContext
from dsv4.model.fused import FusedProjection
from dsv4.model.linear import Linear

__all__ = ["Expert", "Gate", "MoE", "seq_balance_loss"]


class Expert(nn.Module):
    """A clamped SwiGLU feed-forward: ``w2(swiglu(w1 x, w3 x))`` (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, inter_dim: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.gate_up = FusedProjection([self.w1, self.w3])  # w1 and w3 in one matmul

    def forward(self, x: torch.Tensor, kernels: KernelSet) -> torch.Tensor:
        """``x [N, D] -> [N, D]``."""
        gate, up = self.gate_up(x, kernels)
        out: torch.Tensor = self.w2(kernels.swiglu(gate, up, self.limit), kernels)
        return out


class Gate(nn.Module):
    """Router: scores every expert, selects top-k (learned, with a selection-only bias) or by hash."""

    def __init__(self, config: ModelConfig, *, hashed: bool) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.score_func = config.scoring_func
        self.route_scale = config.routed_scaling_factor
        self.hashed = hashed
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # Buffers, not parameters: the bias is updated from expert load, the table is frozen.
        self.bias: torch.Tensor | None
        self.tid2eid: torch.Tensor | None
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
            self.bias = None
        else:
            self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
            self.tid2eid = None

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor, kernels: KernelSet, replay: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights and ids ``[T, k]`` for tokens ``x [T, D]``; ``replay`` imposes the ids of rows
        whose first id is not -1 (routing replay), the weights still come from this forward's scores."""
        imposed = None if self.tid2eid is None else self.tid2eid[input_ids].long()  # hash routing
        if replay is not None:
            imposed = replay if imposed is None else torch.where(replay[:, :1] >= 0, replay, imposed)
        return kernels.route(x, self.weight, self.bias, imposed, score_func=self.score_func, top_k=self.top_k,
                             route_scale=self.route_scale)


class MoE(nn.Module):
    """Routed experts (through the executor) plus the always-on shared expert."""

    def __init__(self, config: ModelConfig, *, hashed: bool) -> None:
        super().__init__()
        self.limit = config.swiglu_limit
        self.gate = Gate(config, hashed=hashed)
        dim, inter = config.hidden_size, config.moe_intermediate_size
        self.experts = nn.ModuleList(Expert(dim, inter, self.limit) for _ in range(config.n_routed_experts))
        self.shared_experts = Expert(dim, inter, self.limit)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor, executor: ExpertExecutor, ctx: StepContext, layer_id: int
    ) -> torch.Tensor:
        """``x [T, D] -> [T, D]``. Records the layer's routed tokens per expert in ``ctx.expert_load``,
        records or replays its experts in ``ctx.routing``, and adds its sequence-wise balance loss to
        ``ctx.balance`` when asked."""
        k, routing = ctx.kernels, ctx.routing
        replay = routing.experts.get(layer_id) if routing is not None and routing.replay else None
        weights, idx = self.gate(x, input_ids, k, replay)
        if routing is not None:
            (routing.applied_experts if routing.replay else routing.experts)[layer_id] = idx.detach()
        ctx.expert_load[layer_id] = _counts(idx.detach().flatten(), len(self.experts))
        if ctx.balance is not None and self.gate.bias is not None and ctx.seq_index is not None:
            scores = k.router_scores(x, self.gate.weight, self.gate.score_func)
            ctx.balance.append(seq_balance_loss(scores, idx, ctx.seq_index, num_seqs=ctx.num_seqs))
        routed = executor.forward(self.experts, x, idx, weights.to(x.dtype), self.limit, k)
        shared: torch.Tensor = self.shared_experts(x, k)
        return routed + shared


def seq_balance_loss(
    scores: torch.Tensor, idx: torch.Tensor, seq_index: torch.Tensor, *, num_seqs: int | None = None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss of one MoE layer (arXiv 2412.19437, §2.1.2).

    Per sequence of ``T`` tokens: ``Σ_i f_i P_i`` with ``f_i = E / (K T) · #{t : i ∈ top-k(t)}`` and
    ``P_i = 1 / T · Σ_t s'_{i,t}``, ``s'`` the affinities ``scores [T_all, E]`` normalised per token;
    averaged over the sequences of ``seq_index [T_all]`` (``num_seqs`` of them: ``seq_index.max() + 1``,
    which a caller that knows it passes, sparing a device read per layer). Its minimum, 1, is a perfectly
    even load.
    """
    n_seq = num_seqs if num_seqs is not None else int(seq_index.max()) + 1
    n_exp, top_k = scores.shape[1], idx.shape[1]
    tokens = _counts(seq_index, n_seq).clamp(min=1).to(scores.dtype).unsqueeze(1)  # [S, 1]
    picked = torch.zeros(n_seq, n_exp, dtype=scores.dtype, device=scores.device)
    picked.index_put_((seq_index.unsqueeze(1).expand_as(idx), idx), torch.ones_like(idx, dtype=scores.dtype),
                      accumulate=True)
    f = picked * (n_exp / top_k) / tokens
    share = scores / scores.sum(dim=-1, keepdim=True)
    p = torch.zeros(n_seq, n_exp, dtype=scores.dtype, device=scores.device).index_add(0, seq_index, share) / tokens
    return (f * p).sum(dim=1).mean()


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of ``0 … n-1`` occurs in ``ids``: ``bincount`` without its host sync (on CUDA it reads
    ``ids.max()`` back to size its output, which would stall every MoE layer)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
