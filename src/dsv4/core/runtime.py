"""Process-wide runtime tuning for CPU work: keep large tensor buffers in the heap.

glibc serves every allocation of 32 MB or more (less, after its adaptive threshold moves) with a
fresh ``mmap`` and unmaps it on free, so a prefill chunk or a training step that makes tens of
large activations pays a page fault per 4 KB page on first touch, every step. Measured on the
development machine (2 cores), a ``[4096, 4, 512]`` fp32 mHC product took 30 ms, 9 ms with the
memory kept in the heap; engine prefill went from ~1800 to ~2800 tokens/s. (The common advice for
PyTorch on CPU is to preload jemalloc or tcmalloc; this gets the same effect without a preload.)

The costs: memory freed by tensors stays with the process (up to the trim threshold) instead of
going back to the OS at once, and workloads of many small tensors get slower: the CI-sized addition
RL run (SFT + GRPO on a 3M-parameter model) took ~10 % longer tuned (165–170 s vs 149–151 s, twice
each). So ``dsv4 serve`` and ``dsv4 batch`` tune, ``dsv4 train`` does not, and :class:`dsv4.Engine`
only with its ``tune_allocator`` option. Set ``DSV4_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_LIMIT = 1 << 30  # allocations below 1 GB come from the heap; up to 1 GB of free heap is kept
_applied: bool | None = None


def tune_allocator() -> bool:
    """Keep allocations under 1 GB in glibc's heap and stop trimming it (once per process).

    Returns whether the tuning is in effect: False off Linux/glibc, or with ``DSV4_MALLOC_TUNING=0``.
    Called by ``dsv4 serve`` and ``dsv4 batch``, and by :class:`dsv4.Engine` with ``tune_allocator=True``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DSV4_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT))
    return _applied
