"""dsv4-triton: Triton kernels for DeepSeek-V4's hot paths, as a dsv4 plugin.

Registers, each named ``triton``: a kernel set (:mod:`dsv4_triton.kernel_set`), an expert executor
(:mod:`dsv4_triton.experts`) and an attention backend (:mod:`dsv4_triton.attention`). They serve CUDA
devices, and the CPU when ``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter (how the
tests run them). Importing this module imports neither torch nor triton: the hooks import their
classes when dsv4 builds its registry.
"""

from __future__ import annotations

from typing import Any

from dsv4.core.hookspecs import hookimpl

__all__ = ["register_attention_backends", "register_expert_executors", "register_kernel_sets"]


@hookimpl
def register_kernel_sets() -> list[type[Any]]:
    """The ``triton`` kernel set."""
    from dsv4_triton.kernel_set import TritonKernels

    return [TritonKernels]


@hookimpl
def register_expert_executors() -> list[type[Any]]:
    """The ``triton`` expert executor."""
    from dsv4_triton.experts import TritonExpertExecutor

    return [TritonExpertExecutor]


@hookimpl
def register_attention_backends() -> list[type[Any]]:
    """The ``triton`` attention backend."""
    from dsv4_triton.attention import TritonAttentionBackend

    return [TritonAttentionBackend]
