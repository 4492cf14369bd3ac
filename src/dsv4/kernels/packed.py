"""MKL-packed weights: faster small-batch fp32 linears on x86 CPUs, for inference.

A decode step multiplies a few dozen rows by each weight, where a plain ``sgemm`` spends much of its
time re-packing the weight into the kernel's panel layout. MKL can pack a weight once
(``cblas_sgemm_pack``) and reuse it: on the development machine (2 cores) this makes a ``[64, 512] x
[512, 32000]`` head 1.35x faster, an 8-row one 2x faster and small ``512 x 512`` projections about
1.3x faster (Inductor packs frozen CPU linears the same way). The packed copies are extra memory,
about the weights' own size again (resident set +250 MB for the 250 MB benchmark model), and are
refreshed when a weight changes (an optimizer step or an RL weight sync), like every derived weight.

Used only where no exact arithmetic is promised: never with autograd, never in batch-invariant mode,
never for very small or large row counts (see below) and never where torch lacks MKL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MAX_PACKED_ROWS", "MIN_PACKED_ROWS", "PackedWeight", "mkl_packing_available", "packing_applies"]

# Below 4 rows a product is bound by reading the weight, and the packed copy is larger: a
# decode step at batch 1 or 2 was 4–8 % slower packed. From 256 rows on a plain sgemm is as fast.
MIN_PACKED_ROWS = 4
MAX_PACKED_ROWS = 256
# The row count MKL tunes the packing for. Measured (2 cores) over 1–256 rows: 64 is never slower
# than a plain sgemm; 1024 helps a 32000-row head at 256 rows but halves small weights' speed.
_PACK_HINT = 64


def packing_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` should take a packed weight: fp32 CPU inference of 4–256 rows."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and MIN_PACKED_ROWS <= x.numel() // x.shape[-1] <= MAX_PACKED_ROWS
    )


def mkl_packing_available() -> bool:
    """Whether this torch build can pack fp32 weights with MKL."""
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedWeight:
    """A lazily packed copy of the weight ``source()`` (``[N, K]`` fp32 on the CPU)."""

    def __init__(self, source: Callable[[], torch.Tensor]) -> None:
        self.source = source
        # The packed tensor's origin is held (not just its address), so a freed weight's address
        # reused by a new one can never match; _version counts in-place updates (optimizer steps,
        # weight syncs), data_ptr catches ``.data`` swaps. (Inference tensors, such as a fused
        # projection's cached concatenation, have no version: they are replaced, not updated.)
        self._origin: torch.Tensor | None = None
        self._key: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ source()^T`` through the packed weight (callers check :func:`packing_applies` first)."""
        weight = self.source()
        key = (weight.data_ptr(), 0 if weight.is_inference() else int(getattr(weight, "_version")))
        if self._packed is None or weight is not self._origin or key != self._key:
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), _PACK_HINT)
            self._origin, self._key = weight, key
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out: torch.Tensor = torch.ops.mkl._mkl_linear(rows, self._packed, weight.detach(), None, rows.shape[0])
        return out.view(*x.shape[:-1], weight.shape[0])
