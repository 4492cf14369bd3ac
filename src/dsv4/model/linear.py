"""The model's linear layer: ``nn.Linear`` without bias, optionally batch-invariant."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.core.numerics import rowwise_linear
from dsv4.model.packed import PackedWeight

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose products can be made batch-invariant (``invariant = True``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.invariant = False
        self.packed: PackedWeight | None = None  # set by Transformer.pack_weights (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T``."""
        if self.packed is not None and not self.invariant and self.packed.applies(x, self.weight):
            return self.packed.linear(x)
        return rowwise_linear(x, self.weight, self.invariant)
