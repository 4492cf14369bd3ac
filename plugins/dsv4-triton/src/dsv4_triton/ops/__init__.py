"""The Triton kernels and their launchers, one module per family (importing one imports triton).

Every launcher takes and returns torch tensors, computes in fp32 whatever the storage dtype, and
returns the dtype the reference op returns. Block sizes are powers of two chosen from the shapes
(no autotuning yet: no GPU has measured any).
"""

__all__ = ["block"]


def block(n: int, lo: int, hi: int) -> int:
    """The power of two ``>= n``, clamped to ``[lo, hi]`` (``lo`` and ``hi`` powers of two)."""
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))
