"""A sample third-party dsv4 plugin.

It registers an attention backend (``"sample"``), an expert executor (``"sample-experts"``) and a
kernel set (``"sample-kernels"``, in :mod:`dsv4_sample_plugin.kernels`) built on dsv4's reference
implementations. Those are imported lazily, inside methods, so that
importing the plugin, which every ``dsv4`` start does, stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from dsv4.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dsv4.core.batch import ForwardBatch
    from dsv4.core.config import ModelConfig
    from dsv4.core.interfaces import AttentionInputs, AttentionLayer, KernelSet, KVPool
    from dsv4.core.kv import StreamSpec


class SampleAttentionBackend:
    """An :class:`~dsv4.core.interfaces.AttentionBackend` that forwards to the reference backend."""

    name: ClassVar[str] = "sample"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        from dsv4.attention.reference import ReferenceAttentionBackend

        return ReferenceAttentionBackend.refuse(config, device)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from dsv4.attention.reference import ReferenceAttentionBackend

        self._inner = ReferenceAttentionBackend(*args, **kwargs)

    def kv_streams(self) -> list[StreamSpec]:
        return self._inner.kv_streams()

    def plan(self, batch: ForwardBatch, pool: KVPool | None, kernels: KernelSet) -> Any:
        return self._inner.plan(batch, pool, kernels)

    def forward(self, layer: AttentionLayer, inputs: AttentionInputs, metadata: Any) -> torch.Tensor:
        return self._inner.forward(layer, inputs, metadata)


class SampleExpertExecutor:
    """An :class:`~dsv4.core.interfaces.ExpertExecutor` that forwards to the reference executor."""

    name: ClassVar[str] = "sample-experts"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        from dsv4.moe.reference import ReferenceExpertExecutor

        return ReferenceExpertExecutor.refuse(config, device)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from dsv4.moe.reference import ReferenceExpertExecutor

        self._inner = ReferenceExpertExecutor(*args, **kwargs)

    def forward(
        self,
        experts: nn.ModuleList,
        x: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        kernels: KernelSet,
    ) -> torch.Tensor:
        return self._inner.forward(experts, x, idx, weights, limit, kernels)


@hookimpl
def register_attention_backends() -> list[type[Any]]:
    return [SampleAttentionBackend]


@hookimpl
def register_expert_executors() -> list[type[Any]]:
    return [SampleExpertExecutor]


@hookimpl
def register_kernel_sets() -> list[type[Any]]:
    from dsv4_sample_plugin.kernels import SampleKernels  # imports torch: only when the registry is built

    return [SampleKernels]
