"""One matmul for several linear projections of the same input.

Small decode batches make every separate matmul pay a fixed overhead; concatenating the weights
turns them into one. Training and inference run the same arithmetic (the same concatenated weight),
so a rollout's numbers equal the trainer's recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsv4.core.numerics import rowwise_linear
from dsv4.model.packed import PackedWeight

__all__ = ["FusedProjection"]


class FusedProjection:
    """``[x @ W_1^T, x @ W_2^T, …]`` computed as ``x @ cat(W_i)^T`` (not a Module: owns no parameters)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = list(linears)
        self.sizes = [lin.out_features for lin in self.linears]
        self._key: tuple[tuple[int, int, torch.device], ...] | None = None
        self._weight: torch.Tensor | None = None
        self.packed: PackedWeight | None = None  # set by Transformer.pack_weights (inference)

    def weight(self) -> torch.Tensor:
        """The concatenated weight; cached (and refreshed when any weight changes) unless autograd needs it."""
        ws = [lin.weight for lin in self.linears]
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return torch.cat(ws)
        # _version counts in-place updates (optimizer steps, weight sync): a changed weight misses the cache.
        key = tuple((w.data_ptr(), int(getattr(w, "_version")), w.device) for w in ws)
        if key != self._key or self._weight is None:
            self._weight, self._key = torch.cat([w.detach() for w in ws]), key
        return self._weight

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The projections of ``x``, in the order of the linears."""
        invariant = bool(getattr(self.linears[0], "invariant", False))
        weight = self.weight()
        if self.packed is not None and not invariant and self.packed.applies(x, weight):
            return list(torch.split(self.packed.linear(x), self.sizes, dim=-1))
        return list(torch.split(rowwise_linear(x, weight, invariant), self.sizes, dim=-1))
