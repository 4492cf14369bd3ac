"""Kernel sets: the model's hot ops (linears, norms, rope, mHC, router, SwiGLU) per step mode.

Built-in plugins: ``reference`` (PyTorch, autograd and inference), ``batch_invariant`` (PyTorch with
batch-independent numerics) and ``cpu`` (native C kernels and MKL-packed weights for CPU inference).
See :class:`dsv4.core.interfaces.KernelSet`.
"""

from dsv4.kernels.cpu import CpuKernels
from dsv4.kernels.reference import BatchInvariantKernels, ReferenceKernels

__all__ = ["BatchInvariantKernels", "CpuKernels", "ReferenceKernels"]
