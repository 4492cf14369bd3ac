"""The ``cpu`` ExpertExecutor: routed experts of decode-sized steps in one native call per layer.

A decode step gives each expert a handful of rows; run one expert at a time, every expert pays two
small BLAS calls, a SwiGLU of several ops and its share of gathers and scatters, and the threads
meet after every product. Here one call (:func:`dsv4.native.kernels.moe_experts`) hands blocks of up
to 16 rows of every expert to the threads, each block doing both products and the SwiGLU with the
weights streamed once from a panel-packed copy, then sums each token's experts in a fixed order
(deterministic whatever the thread schedule).

Large steps (long prefills: more than ``max_assignments`` token-expert pairs, where BLAS is at its
best), autograd and non-float32 inputs take the reference loop, so training is unaffected. The
packed copies (about the expert weights' memory again) are refreshed when a weight changes.
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
from dsv4.native import kernels as native
from dsv4.native import unavailable_reason

__all__ = ["CpuExpertExecutor"]

_Pack = tuple[list[torch.Tensor], tuple[int, ...], torch.Tensor, torch.Tensor]


class CpuExpertExecutor:
    """Native-kernel routed experts for CPU inference; the reference loop otherwise."""

    name: ClassVar[str] = "cpu"
    capabilities: ClassVar[frozenset[str]] = frozenset({"training", "cpu"})

    def __init__(
        self, config: ModelConfig | None = None, device: torch.device | str = "cpu", *, max_assignments: int = 1024
    ) -> None:
        self.max_assignments = max_assignments
        self._loop = ReferenceExpertExecutor(config, device)
        # Keyed by the experts' ModuleList (weakly): an entry dies with its model.
        self._packs: weakref.WeakKeyDictionary[nn.ModuleList, _Pack] = weakref.WeakKeyDictionary()

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Needs the CPU, dims the kernel tiles (hidden a multiple of 16, expert width of 8) and the kernels."""
        if torch.device(device).type != "cpu":
            return f"runs on the CPU only, not {device}"
        if config.hidden_size % 16 or config.moe_intermediate_size % 8:
            return (f"hidden_size {config.hidden_size} must be a multiple of 16 and moe_intermediate_size "
                    f"{config.moe_intermediate_size} of 8")
        return unavailable_reason()

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
        first = experts[0]
        assert isinstance(first, Expert)
        if (
            idx.numel() > self.max_assignments
            or kernels.mode != "inference"
            or x.shape[-1] % 16
            or not native.supports(x, weights, first.w1.weight)
        ):
            return self._loop.forward(experts, x, idx, weights, limit, kernels)
        gate_up, down = self._packed(experts)
        return native.moe_experts(x, gate_up, down, idx, weights.float(), limit)

    def _packed(self, experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        """Panel-packed ``[E, 2I/16, D, 16]`` (w1 over w3) and ``[E, D/16, I, 16]`` (w2), cached until a
        weight changes (held tensors + versions, as :class:`dsv4.kernels.packed.PackedWeight`)."""
        ws: list[torch.Tensor] = []
        for e in experts:
            assert isinstance(e, Expert)
            ws += [e.w1.weight, e.w3.weight, e.w2.weight]
        key = tuple(0 if w.is_inference() else int(getattr(w, "_version")) for w in ws)
        cached = self._packs.get(experts)
        if cached is not None and cached[1] == key and all(a is b for a, b in zip(cached[0], ws, strict=True)):
            return cached[2], cached[3]
        gate_up = torch.stack([native.pack_panels(torch.cat((ws[i], ws[i + 1]))) for i in range(0, len(ws), 3)])
        down = torch.stack([native.pack_panels(ws[i + 2]) for i in range(0, len(ws), 3)])
        self._packs[experts] = (ws, key, gate_up, down)
        return gate_up, down
