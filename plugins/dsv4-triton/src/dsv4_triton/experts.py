"""The ``triton`` expert executor: routed experts as a grouped GEMM (:mod:`dsv4_triton.ops.experts`).

Inference steps run the kernels on the experts' weights stacked per layer (``[E, 2I, D]`` and
``[E, D, I]``: the expert weights' memory again, refreshed when a weight changes). Autograd and
batch-invariant steps take the reference loop, so training and true on-policy RL are unchanged.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import KernelSet
from dsv4.model.moe import Expert
from dsv4.moe.reference import ReferenceExpertExecutor
from dsv4_triton.device import refuse_device
from dsv4_triton.ops.experts import moe_experts

__all__ = ["TritonExpertExecutor"]

_Stack = tuple[tuple[object, ...], torch.Tensor, torch.Tensor]


class TritonExpertExecutor:
    """Grouped-GEMM routed experts for inference on CUDA (the CPU under ``TRITON_INTERPRET=1``)."""

    name: ClassVar[str] = "triton"
    # training: autograd and batch-invariant steps take the reference loop
    capabilities: ClassVar[frozenset[str]] = frozenset({"training", "cuda"})

    def __init__(self, config: ModelConfig | None = None, device: torch.device | str = "cpu") -> None:
        self._loop = ReferenceExpertExecutor(config, device)
        # Keyed by the experts' ModuleList itself (weakly): an entry dies with its model.
        self._stacks: weakref.WeakKeyDictionary[nn.ModuleList, _Stack] = weakref.WeakKeyDictionary()

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """A CUDA device, or the CPU under Triton's interpreter."""
        return refuse_device(torch.device(device))

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
        if kernels.mode != "inference":
            return self._loop.forward(experts, x, idx, weights, limit, kernels)
        up, down = self._stacked(experts)
        return moe_experts(x, idx, weights, up, down, limit)

    def _stacked(self, experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        """``[E, 2I, D]`` (w1 over w3) and ``[E, D, I]`` (w2), kept until a weight changes."""
        ws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for e in experts:
            assert isinstance(e, Expert)
            ws.append((e.w1.weight, e.w3.weight, e.w2.weight))
        key = tuple((w.data_ptr(), 0 if w.is_inference() else int(getattr(w, "_version"))) for trio in ws for w in trio)
        cached = self._stacks.get(experts)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                up = torch.stack([torch.cat((w1, w3)) for w1, w3, _ in ws])
                down = torch.stack([w2 for _, _, w2 in ws])
            cached = self._stacks[experts] = (key, up, down)
        return cached[1], cached[2]
