"""The sample plugin's kernel set: the reference ops, with RMSNorm replaced by an implementation of its own.

A hardware plugin starts the same way: subclass the reference kernel set, declare the step modes it
computes, override the ops it has kernels for, and check it with
``dsv4.testing.contracts.check_kernel_set``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dsv4.kernels import ReferenceKernels


class SampleKernels(ReferenceKernels):
    """Inference steps; ``rms_norm`` is this plugin's own, every other op the reference's."""

    name: ClassVar[str] = "sample-kernels"
    capabilities: ClassVar[frozenset[str]] = frozenset({"inference", "cpu"})

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """``x / rms(x) · weight`` in fp32, written out (a stand-in for a device kernel)."""
        xf = x.float()
        out = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out if weight is None else out * weight.float()).to(x.dtype)
