"""The built-in plugin: dsv4's pure-PyTorch reference implementations, registered like any other.

Always loaded by :mod:`dsv4.core.plugins` (whatever ``DSV4_PLUGINS`` says). Implementations are
imported inside the hooks, so loading the plugin costs nothing until the registry is built.
"""

from __future__ import annotations

from typing import Any

from dsv4.core.hookspecs import hookimpl


@hookimpl
def register_attention_backends() -> list[type[Any]]:
    """The reference attention backend (``"reference"``) and its native-CPU variant (``"cpu"``)."""
    from dsv4.attention.cpu import CpuAttentionBackend
    from dsv4.attention.reference import ReferenceAttentionBackend

    return [ReferenceAttentionBackend, CpuAttentionBackend]


@hookimpl
def register_kv_pools() -> list[type[Any]]:
    """The paged KV pool (``"paged"``)."""
    from dsv4.cache.paged import PagedKVPool

    return [PagedKVPool]


@hookimpl
def register_expert_executors() -> list[type[Any]]:
    """The reference expert executor (``"reference"``), the batched one (``"grouped"``) and the
    native-kernel one (``"cpu"``)."""
    from dsv4.moe.cpu import CpuExpertExecutor
    from dsv4.moe.grouped import GroupedExpertExecutor
    from dsv4.moe.reference import ReferenceExpertExecutor

    return [ReferenceExpertExecutor, GroupedExpertExecutor, CpuExpertExecutor]


@hookimpl
def register_verifiers() -> list[type[Any]]:
    """Answer, math, format and sandboxed-code verifiers (``"exact"``, ``"numeric"``, ``"math"``,
    ``"regex"``, ``"format"``, ``"code"``)."""
    from dsv4.rl.verifiers import BUILTIN_VERIFIERS

    return list(BUILTIN_VERIFIERS)


@hookimpl
def register_schedulers() -> list[type[Any]]:
    """FCFS continuous batching with chunked prefill and preemption (``"fcfs"``)."""
    from dsv4.engine.scheduler import FCFSScheduler

    return [FCFSScheduler]


@hookimpl
def register_kernel_sets() -> list[type[Any]]:
    """PyTorch (``"reference"``), batch-invariant PyTorch (``"batch_invariant"``) and native CPU
    inference (``"cpu"``) kernel sets."""
    from dsv4.kernels import BatchInvariantKernels, CpuKernels, ReferenceKernels

    return [ReferenceKernels, BatchInvariantKernels, CpuKernels]
