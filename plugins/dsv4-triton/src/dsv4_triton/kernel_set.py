"""The ``triton`` kernel set: DeepSeek-V4's hot ops as Triton kernels, for inference steps.

Every op of :class:`dsv4.core.interfaces.KernelSet` but one runs a kernel of :mod:`dsv4_triton.ops`;
``rope_cis`` (the step's complex rotation table, computed once per step) is the reference's. Inference
only: autograd and batch-invariant steps keep dsv4's PyTorch kernel sets, chosen for those modes by
``choose_plugins``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import LinearWeights, StepMode
from dsv4.kernels.reference import ReferenceKernels, stacked_weight
from dsv4_triton.device import refuse_device
from dsv4_triton.ops import matmul, mhc, moe, norm

__all__ = ["TritonKernels"]


class TritonKernels(ReferenceKernels):
    """Triton kernels for inference on CUDA (or on the CPU under ``TRITON_INTERPRET=1``)."""

    name: ClassVar[str] = "triton"
    capabilities: ClassVar[frozenset[str]] = frozenset({"inference", "cuda"})

    @classmethod
    def refuse(cls, config: ModelConfig | None, device: torch.device, mode: StepMode) -> str | None:
        """Inference steps on a CUDA device (the CPU under Triton's interpreter)."""
        return super().refuse(config, device, mode) or refuse_device(torch.device(device))

    def linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """Tiled matmul ``x @ W^T`` (W: the layer's weights stacked)."""
        return matmul.linear(x, stacked_weight(layer))

    def grouped_linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """One tiled matmul per group, the groups a grid axis."""
        return matmul.grouped_linear(x, stacked_weight(layer))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """RMSNorm over tiles of rows."""
        return norm.rms_norm(x, weight, eps)

    def rope(self, x: torch.Tensor, cis: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """Interleaved partial RoPE."""
        return norm.rope(x, cis, inverse)

    def hc_pre(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
        *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC collapse: the mixing product, then pre/post, the Sinkhorn comb and the collapse in one pass."""
        return mhc.hc_pre(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)

    def hc_post(self, f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """mHC expansion in one pass."""
        return mhc.hc_post(f, h, post, comb)

    def hc_head(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, rms_eps: float,
        hc_eps: float,
    ) -> torch.Tensor:
        """Final mHC collapse: the mixing product, then pre and the collapse."""
        return mhc.hc_head(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps)

    def route(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, imposed: torch.Tensor | None,
        *, score_func: str, top_k: int, route_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores, top-k (or the imposed ids) and weights in one kernel."""
        return moe.route(x, weight, bias, imposed, score_func=score_func, top_k=top_k, route_scale=route_scale)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
        """Clamped SwiGLU."""
        return moe.swiglu(gate, up, limit)

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Chosen-token logprobs with an online logsumexp."""
        return norm.token_logprobs(logits, tokens)
