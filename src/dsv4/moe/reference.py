"""The reference ExpertExecutor: tokens sorted by expert, one matmul group per expert that has tokens."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import KernelSet

__all__ = ["ReferenceExpertExecutor"]


class ReferenceExpertExecutor:
    """Pure-PyTorch routed-expert execution; differentiable, any device."""

    name: ClassVar[str] = "reference"
    # batch_invariant: per-expert products go through the step's kernel set (tiled in batch-invariant
    # steps), and each token
    # sums its experts in expert-id order whatever else is in the batch.
    capabilities: ClassVar[frozenset[str]] = frozenset({"training", "batch_invariant", "cpu", "cuda"})

    def __init__(self, config: ModelConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Runs any configuration."""
        return None

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
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(experts)).tolist()
        token = order // k  # token of each (sorted) assignment
        xs = x[token]
        ws = weights.reshape(-1)[order].unsqueeze(-1)
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outs.append(experts[e](xs[start : start + n], kernels) * ws[start : start + n])
                start += n
        if not outs:
            return torch.zeros_like(x)
        return torch.zeros_like(x).index_add(0, token, torch.cat(outs))
