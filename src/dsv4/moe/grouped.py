"""A grouped ExpertExecutor: every expert's tokens padded into one batch, two ``bmm`` calls in all.

Decode steps of many sequences make a per-expert loop pay a fixed cost per expert; stacking the
experts' weights and padding each expert's tokens to the busiest expert's count trades some padded
FLOPs for two large batched matmuls. Large steps (long prefills, training) and tiny ones (a few
sequences, most experts idle) use the per-expert loop instead, as do steps whose expert weights are
MKL-packed (CPU inference, :mod:`dsv4.kernels.packed`), where packed per-expert products are faster.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import KernelSet
from dsv4.kernels.cpu import CpuKernels
from dsv4.kernels.packed import packing_applies
from dsv4.model.moe import Expert
from dsv4.moe.reference import ReferenceExpertExecutor

__all__ = ["GroupedExpertExecutor"]


class GroupedExpertExecutor:
    """Padded batched experts for small steps, the reference loop for large ones."""

    name: ClassVar[str] = "grouped"
    capabilities: ClassVar[frozenset[str]] = frozenset({"training", "cpu", "cuda"})

    def __init__(
        self, config: ModelConfig | None = None, device: torch.device | str = "cpu", *, max_assignments: int = 1024
    ) -> None:
        self.max_assignments = max_assignments  # token-expert pairs above which the loop is used
        self._loop = ReferenceExpertExecutor(config, device)
        # Keyed by the experts' ModuleList itself (weakly): an entry dies with its model, so a new
        # model can never pick up a stale stack.
        self._stacks: weakref.WeakKeyDictionary[nn.ModuleList, tuple[tuple[object, ...], torch.Tensor, torch.Tensor]]
        self._stacks = weakref.WeakKeyDictionary()

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Runs any configuration."""
        return None

    def _stacked(self, experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        """``[E, 2I, D]`` (w1 over w3) and ``[E, D, I]`` (w2), cached until a weight changes."""
        ws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for e in experts:
            assert isinstance(e, Expert)
            ws.append((e.w1.weight, e.w3.weight, e.w2.weight))
        grad = torch.is_grad_enabled() and ws[0][0].requires_grad
        key = tuple((w.data_ptr(), int(getattr(w, "_version"))) for trio in ws for w in trio)
        cached = self._stacks.get(experts)
        if not grad and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        up = torch.stack([torch.cat((w1, w3)) for w1, w3, _ in ws])
        down = torch.stack([w2 for _, _, w2 in ws])
        if not grad:
            self._stacks[experts] = (key, up, down)
        return up, down

    def forward(
        self,
        experts: nn.ModuleList,
        x: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        kernels: KernelSet,
    ) -> torch.Tensor:
        """``Σ_k weights[t, k] · expert_{idx[t, k]}(x[t])`` for ``x [T, D]``, ``idx, weights [T, k]``."""
        # Too many tokens: padding wastes more than batching saves. Too few (decode of a handful of
        # sequences): a padded batch would read every expert's weights for the two that are used.
        # MKL-packed expert weights (CPU inference): per-expert packed products beat the padded
        # batched product at every decode size measured (8–64 sequences).
        if idx.numel() > self.max_assignments or idx.numel() < 4 * len(experts) or _packed(kernels, experts, x):
            return self._loop.forward(experts, x, idx, weights, limit, kernels)
        n_exp, k = len(experts), idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        counts = torch.bincount(flat, minlength=n_exp)
        width = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        slot = expert * width + torch.arange(expert.shape[0], device=x.device) - first[expert]  # padded row
        token = order // k
        up, down = self._stacked(experts)
        xp = x.new_zeros(n_exp * width, x.shape[1]).index_copy(0, slot, x[token])
        h = torch.bmm(xp.view(n_exp, width, -1), up.transpose(1, 2))  # [E, width, 2I]
        gate, val = h.chunk(2, dim=-1)
        y = torch.bmm(kernels.swiglu(gate, val, limit), down.transpose(1, 2)).reshape(n_exp * width, -1)
        y = y.index_select(0, slot) * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add(0, token, y)


def _packed(kernels: KernelSet, experts: nn.ModuleList, x: torch.Tensor) -> bool:
    """Whether the experts' products would run through MKL-packed weights for ``x``."""
    first = experts[0]
    assert isinstance(first, Expert)
    return isinstance(kernels, CpuKernels) and kernels.packed and packing_applies(x, first.w2.weight)
