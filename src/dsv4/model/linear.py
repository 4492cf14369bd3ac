"""The model's linear layer: ``nn.Linear`` without bias, computed by the step's kernel set."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsv4.core.interfaces import KernelSet

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` without bias; ``cache`` holds what kernel sets derive from the weight (packed copies)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.cache: dict[str, Any] = {}

    @property
    def weights(self) -> tuple[torch.Tensor]:
        """The weight, as :class:`dsv4.core.interfaces.LinearWeights` has it."""
        return (self.weight,)

    def forward(self, x: torch.Tensor, kernels: KernelSet) -> torch.Tensor:  # type: ignore[override]
        """``x @ weight^T``."""
        return kernels.linear(x, self)
