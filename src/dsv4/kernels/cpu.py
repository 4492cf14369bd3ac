"""The ``cpu`` kernel set: CPU inference through dsv4's fused C kernels and MKL-packed weights.

Inference only (no autograd, not batch-invariant). Each op takes its native kernel
(:mod:`dsv4.native.kernels`) when the kernels are built and the tensors fit (float32 CPU tensors of
supported shapes), and small-batch linears run through MKL-packed weights
(:mod:`dsv4.kernels.packed`); everything else is the ``reference`` kernel set's inference arithmetic,
which is what the native kernels are tested against. Options (the engine's settings of the same
names): ``native_kernels`` (default on) and ``packed_weights`` (default on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import LinearWeights, StepMode
from dsv4.kernels.packed import PackedWeight, mkl_packing_available, packing_applies
from dsv4.kernels.reference import ReferenceKernels, stacked_weight
from dsv4.native import available, kernels

__all__ = ["CpuKernels"]

_MAX_STREAMS = 16  # mHC streams the native kernels take


class CpuKernels(ReferenceKernels):
    """Native C kernels and MKL-packed linears for float32 CPU inference; the reference ops otherwise."""

    name: ClassVar[str] = "cpu"
    capabilities: ClassVar[frozenset[str]] = frozenset({"inference", "cpu"})

    def __init__(
        self,
        config: ModelConfig | None = None,
        device: torch.device | str = "cpu",
        mode: StepMode = "inference",
        *,
        max_context: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(config, device, mode, max_context=max_context, options=options)
        options = options or {}
        self.native = bool(options.get("native_kernels", True)) and available()
        self.packed = bool(options.get("packed_weights", True)) and mkl_packing_available()

    @classmethod
    def refuse(cls, config: ModelConfig | None, device: torch.device, mode: StepMode) -> str | None:
        """Inference on the CPU."""
        if torch.device(device).type != "cpu":
            return f"runs on the CPU only, not {device}"
        return super().refuse(config, device, mode)

    def linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """Through the layer's MKL-packed weight where packing pays (4–256 fp32 rows)."""
        if self.packed and packing_applies(x, layer.weights[0]):
            packed = layer.cache.get("mkl_packed")
            if packed is None:
                packed = layer.cache["mkl_packed"] = PackedWeight(lambda: stacked_weight(layer))
            assert isinstance(packed, PackedWeight)
            return packed.linear(x)
        return super().linear(x, layer)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Native RMSNorm."""
        if self.native and kernels.supports(x, *(() if weight is None else (weight,))):
            return kernels.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def rope(self, x: torch.Tensor, cis: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """Native RoPE."""
        if self.native and cis.dim() == 2 and kernels.supports(x):
            return kernels.rope(x, cis, inverse)
        return super().rope(x, cis, inverse=inverse)

    def hc_pre(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
        *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC collapse in one native pass (mix, pre/post, Sinkhorn, collapse)."""
        if (self.native and h.shape[-1] % 16 == 0 and h.shape[-2] <= _MAX_STREAMS
                and kernels.supports(h, fn, base, scale)):
            return kernels.hc_pre(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
        return super().hc_pre(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)

    def hc_post(self, f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Native mHC expansion."""
        if self.native and h.shape[-2] <= _MAX_STREAMS and kernels.supports(f, h, post, comb):
            return kernels.hc_post(f, h, post, comb)
        return super().hc_post(f, h, post, comb)

    def route(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, imposed: torch.Tensor | None,
        *, score_func: str, top_k: int, route_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Native router (scores, top-k, weights) in one call."""
        if self.native and x.dim() == 2 and kernels.supports(x, weight):
            return kernels.moe_gate(x, weight, bias, score_func, top_k, route_scale, imposed)
        return super().route(x, weight, bias, imposed, score_func=score_func, top_k=top_k, route_scale=route_scale)
