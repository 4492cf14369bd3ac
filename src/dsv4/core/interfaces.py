"""The five core interfaces every dsv4 component is written against.

Each is a small :class:`typing.Protocol` (no implementation inheritance). Every implementation has

- ``name``: the unique name it is selected by (``attention_backend="reference"``),
- ``capabilities``: a frozenset of feature strings it supports (optional features are capabilities,
  never ``NotImplementedError``),
- ``refuse(...)``: a classmethod that returns ``None`` when it can serve the given configuration, or a
  one-sentence reason why it cannot.

Implementations are registered through pluggy hooks (see :mod:`dsv4.core.hookspecs`); the registry
builds objects once, so no hook runs on a hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from torch import nn

    from dsv4.core.batch import ForwardBatch
    from dsv4.core.config import ModelConfig
    from dsv4.core.kv import StreamSpec

__all__ = [
    "INTERFACES",
    "AttentionBackend",
    "AttentionInputs",
    "AttentionLayer",
    "CompressorParams",
    "CompressorInputs",
    "ExpertExecutor",
    "IndexerInputs",
    "IndexerParams",
    "KVPool",
    "NormParams",
    "RoutingTrace",
    "Scheduler",
    "Verifier",
    "VerifyResult",
    "VerifySample",
]


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CompressorInputs:
    """Per-token projections a compressor pools into block entries (ape not yet added)."""

    kv: torch.Tensor  # [T, coff*c]  x @ wkv^T
    score: torch.Tensor  # [T, coff*c]  x @ wgate^T


@dataclass(frozen=True, slots=True)
class IndexerInputs:
    """What the lightning indexer needs for the new tokens of a ratio-4 layer."""

    q: torch.Tensor  # [T, n_I, c_I]  rope applied
    weights: torch.Tensor  # [T, n_I]  weights_proj(x) * n_I^-0.5 (c_I^-0.5 applies after the relu)
    keys: CompressorInputs  # the indexer's own compressor projections


@dataclass(slots=True)
class RoutingTrace:
    """The discrete choices of one step, per layer, for its rows: recorded during a rollout and
    replayed in the trainer's forward, so both compute the same experts and the same sparse entries.

    ``experts[layer]`` is ``[T, k]`` expert ids; ``indexer[layer]`` is ``[T, index_topk]`` compressed
    entry ids (-1: no entry). In replay, a row whose first id is -1 is computed, not replayed.
    """

    replay: bool = False
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    indexer: dict[int, torch.Tensor] = field(default_factory=dict)
    # In replay: the expert ids each layer actually used (to check that the replay took effect).
    applied_experts: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """Everything one attention layer computed for the T new tokens of a step."""

    q: torch.Tensor  # [T, H, d]  per-head RMS + rope
    kv: torch.Tensor  # [T, d]  kv_norm + rope; the one shared head is K and V
    compressor: CompressorInputs | None = None  # ratio > 0
    indexer: IndexerInputs | None = None  # ratio 4
    # When not None, a backend with the "indexer_loss" capability appends the indexer's training
    # objective here (key "indexer_kl", one scalar per ratio-4 layer).
    aux: dict[str, list[torch.Tensor]] | None = None
    # Record (or replay) the indexer's top-k per row (routing replay for RL).
    routing: RoutingTrace | None = None


class NormParams(Protocol):
    """An RMSNorm's parameters."""

    @property
    def weight(self) -> torch.Tensor: ...  # noqa: D102
    @property
    def eps(self) -> float: ...  # noqa: D102


class CompressorParams(Protocol):
    """What a backend reads from a compressor module to pool blocks into entries."""

    @property
    def ratio(self) -> int: ...  # noqa: D102
    @property
    def overlap(self) -> bool: ...  # noqa: D102  (two half-series, ratio-4 layers)
    @property
    def ape(self) -> torch.Tensor: ...  # noqa: D102  [m, coff*c]
    @property
    def norm(self) -> NormParams: ...  # noqa: D102
    @property
    def inv_freq(self) -> torch.Tensor: ...  # noqa: D102  rope of entries at their block's first position
    @property
    def finish(self) -> Callable[[torch.Tensor], torch.Tensor] | None: ...  # noqa: D102  fake quantisation


class IndexerParams(Protocol):
    """What a backend reads from a lightning indexer module."""

    @property
    def compressor(self) -> CompressorParams: ...  # noqa: D102


class AttentionLayer(Protocol):
    """What a backend reads from the attention layer it computes (parameters and static facts)."""

    @property
    def layer_id(self) -> int: ...  # noqa: D102
    @property
    def ratio(self) -> int: ...  # noqa: D102  0, or the compression ratio m
    @property
    def softmax_scale(self) -> float: ...  # noqa: D102
    @property
    def index_topk(self) -> int: ...  # noqa: D102
    @property
    def attn_sink(self) -> torch.Tensor: ...  # noqa: D102  [H]
    @property
    def compressor(self) -> CompressorParams | None: ...  # noqa: D102
    @property
    def indexer(self) -> IndexerParams | None: ...  # noqa: D102


@runtime_checkable
class AttentionBackend(Protocol):
    """Computes DeepSeek-V4 attention (window + compressed + sparse) for a ragged batch.

    Split as in SGLang: :meth:`plan` builds per-step metadata once (index tensors, visibility limits),
    :meth:`forward` does one layer's math with it. The backend owns the layout of what it reads and
    writes in the :class:`KVPool`.
    """

    name: ClassVar[str]
    # e.g. {"training", "paged", "fake_quant"}; "shared_prefix": without a pool, a request may read its
    # prefix from another request of the same batch (ForwardBatch.parents)
    capabilities: ClassVar[frozenset[str]]

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """``None`` if this backend can serve ``config`` on ``device``, else the reason."""
        ...

    def kv_streams(self) -> list[StreamSpec]:
        """The streams this backend keeps in a :class:`KVPool` (it owns its KV layout)."""
        ...

    def plan(self, batch: ForwardBatch, pool: KVPool | None) -> Any:
        """Build the step's metadata (``pool=None``: the batch holds whole sequences, no cache)."""
        ...

    def forward(self, layer: AttentionLayer, inputs: AttentionInputs, metadata: Any) -> torch.Tensor:
        """Attention output ``[T, H, d]`` of ``layer`` for the new tokens (before de-rotation)."""
        ...


# --------------------------------------------------------------------------------------------------
# KV memory
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class KVPool(Protocol):
    """Owns KV memory: fixed-size pages per stream, a free list, per-request page tables.

    A *stream* is an append-only, per-request log of fixed-width rows in every layer that has it
    (window kv, compressor rows, compressed entries, indexer keys, ...). Rows are addressed by
    ``(request, logical index)``; the pool maps them to physical slots and may free a prefix that
    will never be read again. It knows nothing of attention math.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """``None`` if this pool can hold ``config``'s cache on ``device``, else the reason."""
        ...

    def reserve(self, rid: int, num_tokens: int) -> None:
        """Make every stream's rows of a request holding ``num_tokens`` tokens addressable.

        Raises :class:`MemoryError` (leaving the pool unchanged) when pages run out.
        """
        ...

    def slots(self, stream: str, rids: Sequence[int], req: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Physical slots of rows ``logical`` of requests ``rids[req]`` (elementwise, long tensor)."""
        ...

    def buffer(self, layer_id: int, stream: str) -> torch.Tensor:
        """The ``[num_slots, width]`` storage of ``stream`` in layer ``layer_id``."""
        ...

    def release(self, rid: int, num_tokens: int | None = None) -> None:
        """Free rows a request of ``num_tokens`` tokens no longer reads (``None``: all of ``rid``)."""
        ...

    def pages_used(self, stream: str) -> int:
        """Pages of ``stream`` owned by some request."""
        ...

    def pages_free(self, stream: str) -> int:
        """Pages of ``stream`` that can still be handed out."""
        ...

    def bytes_used(self, stream: str) -> int:
        """Bytes of ``stream`` held by requests, across all its layers."""
        ...

    # Pools with the "fork" capability also have
    #   fork(src: int, dst: int | Sequence[int]) -> None
    # which gives ``dst`` (one request or several, holding no pages) a copy of every row ``src`` may
    # still read, raising MemoryError (pool unchanged) when pages run out for all of them: the engine
    # prefills a prompt sampled n times once.


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class ExpertExecutor(Protocol):
    """Runs routed experts: tokens with their top-k expert ids and weights in, combined output out.

    Routing itself (scores, hash table, selection bias) stays in the model.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]  # e.g. {"training", "fp4_weights"}

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """``None`` if this executor can run ``config``'s experts on ``device``, else the reason."""
        ...

    def forward(
        self, experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, limit: float
    ) -> torch.Tensor:
        """``Σ_k weights[t,k] · expert_{idx[t,k]}(x[t])`` for ``x [T, D]``, ``idx/weights [T, k]``."""
        ...


# --------------------------------------------------------------------------------------------------
# Verifiers (RL rewards)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VerifySample:
    """One completion to check: the prompt, the model's answer and the task's reference data."""

    prompt: str
    completion: str
    reference: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """A verifier's verdict; a crash or timeout is a recorded failure (``error``), not an exception."""

    reward: float
    correct: bool
    error: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    """Checks completions and turns them into rewards (no preference model)."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]  # e.g. {"async", "batched", "sandboxed"}

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """``None`` if this verifier accepts ``options``, else the reason."""
        ...

    async def verify(self, samples: Sequence[VerifySample]) -> list[VerifyResult]:
        """One result per sample, in order; never raises for a bad sample."""
        ...


# --------------------------------------------------------------------------------------------------
# Scheduling
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class Scheduler(Protocol):
    """Decides which requests run in the next step and how many new tokens each contributes."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]  # e.g. {"chunked_prefill", "preemption"}

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """``None`` if this scheduler accepts ``options``, else the reason."""
        ...

    def add(self, request: Any) -> None:
        """Queue a new request."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its memory is released."""
        ...

    def schedule(self) -> Any:
        """The next step's work (requests and new-token counts), or an empty plan."""
        ...

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        ...

    # Schedulers with the "fork" capability also have
    #   adopt(request: Any) -> bool
    # which runs a request that already holds its KV cache (a sample given a copy of its prompt's)
    # from the next step on, or returns False (nothing changed) when the running set is full.


#: The interfaces by the hook-friendly kind name used in the registry.
INTERFACES: dict[str, type[Any]] = {
    "attention_backend": AttentionBackend,
    "kv_pool": KVPool,
    "expert_executor": ExpertExecutor,
    "verifier": Verifier,
    "scheduler": Scheduler,
}
