"""One matmul for several linear projections of the same input.

Small decode batches make every separate matmul pay a fixed overhead; stacking the weights turns
them into one. Training and inference run the same arithmetic (one product with the stacked weight),
so a rollout's numbers equal the trainer's recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsv4.core.interfaces import KernelSet
from dsv4.model.linear import Linear

__all__ = ["FusedProjection"]


class FusedProjection:
    """``[x @ W_1^T, x @ W_2^T, …]`` computed as ``x @ cat(W_i)^T`` (not a Module: owns no parameters)."""

    def __init__(self, linears: Sequence[Linear]) -> None:
        self.linears = list(linears)
        self.sizes = [lin.out_features for lin in self.linears]
        self.cache: dict[str, Any] = {}  # what kernel sets derive from the stacked weight

    @property
    def weights(self) -> list[torch.Tensor]:
        """The linears' weights, whose rows the product stacks."""
        return [lin.weight for lin in self.linears]

    def __call__(self, x: torch.Tensor, kernels: KernelSet) -> list[torch.Tensor]:
        """The projections of ``x``, in the order of the linears."""
        return list(torch.split(kernels.linear(x, self), self.sizes, dim=-1))
