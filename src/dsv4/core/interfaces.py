"""The core interfaces every dsv4 component is written against.

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

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeGuard, TypeVar, runtime_checkable

import torch

if TYPE_CHECKING:
    from torch import nn

    from dsv4.core.batch import ForwardBatch
    from dsv4.core.config import ModelConfig
    from dsv4.core.kv import StreamSpec

__all__ = [
    "INTERFACES",
    "AdoptingScheduler",
    "AttentionBackend",
    "AttentionInputs",
    "AttentionLayer",
    "CompressorParams",
    "CompressorInputs",
    "ExpertExecutor",
    "ForkingKVPool",
    "IndexerInputs",
    "IndexerParams",
    "KVPool",
    "KernelSet",
    "LinearWeights",
    "NormParams",
    "ResumingScheduler",
    "RoutingTrace",
    "STEP_MODES",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
    "SeqT",
    "SequenceStatus",
    "SharingKVPool",
    "StepMode",
    "Verifier",
    "VerifyResult",
    "VerifySample",
    "can_adopt",
    "can_fork",
    "can_resume",
    "can_share",
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

    def plan(self, batch: ForwardBatch, pool: KVPool | None, kernels: KernelSet) -> Any:
        """Build the step's metadata (``pool=None``: the batch holds whole sequences, no cache).

        ``kernels`` is the step's kernel set: its ``mode`` says whether the step runs with autograd,
        for inference or batch-invariant (then gathers are sized for ``kernels.max_context``), and its
        ops are the ones to use for norms and rope inside attention.
        """
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
    capabilities: ClassVar[frozenset[str]]  # e.g. {"paged", "window_recycling", "fork"}

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """``None`` if this pool can hold ``config``'s cache on ``device``, else the reason."""
        ...

    @property
    def streams(self) -> Mapping[str, StreamSpec]:
        """The streams it holds, by name (those of the attention backend's ``kv_streams()``)."""
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


@runtime_checkable
class ForkingKVPool(KVPool, Protocol):
    """A :class:`KVPool` with the ``"fork"`` capability: the engine prefills a prompt sampled n times once."""

    def fork(self, src: int, dst: int | Sequence[int]) -> None:
        """Give ``dst`` (one request or several, holding no pages) a copy of every row ``src`` may still
        read. Raises :class:`MemoryError` (pool unchanged) when pages run out for all of them."""
        ...


def can_fork(pool: KVPool) -> TypeGuard[ForkingKVPool]:
    """Whether ``pool`` declares the ``"fork"`` capability, and so is a :class:`ForkingKVPool`."""
    return "fork" in pool.capabilities


@runtime_checkable
class SharingKVPool(KVPool, Protocol):
    """A :class:`KVPool` with the ``"share"`` capability: holders share the pages of a common prefix
    (what a prefix cache, and prompt sharing without copies, are built on)."""

    #: Called when a stream runs short of pages: frees something (the engine's prefix cache evicts
    #: a checkpoint) and returns True, or returns False when it has nothing left to give.
    reclaimer: Callable[[], bool] | None

    def share(self, src: int, dst: int, num_tokens: int) -> None:
        """Give ``dst`` (holding no pages) every row a request of ``num_tokens`` tokens reads, as ``src``
        holds them, each then writing its own rows from there; ``src`` has computed at least
        ``num_tokens`` tokens and still holds those rows. Raises :class:`MemoryError` (pool unchanged)
        when pages run out."""
        ...

    def pages_only_held_by(self, stream: str, rids: Collection[int]) -> int:
        """Pages of ``stream`` that releasing every holder in ``rids`` would free."""
        ...

    def bytes_only_held_by(self, rids: Collection[int]) -> int:
        """Bytes (every stream) that releasing every holder in ``rids`` would free."""
        ...


def can_share(pool: KVPool) -> TypeGuard[SharingKVPool]:
    """Whether ``pool`` declares the ``"share"`` capability, and so is a :class:`SharingKVPool`."""
    return "share" in pool.capabilities


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
        self,
        experts: nn.ModuleList,
        x: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        kernels: KernelSet,
    ) -> torch.Tensor:
        """``Σ_k weights[t,k] · expert_{idx[t,k]}(x[t])`` for ``x [T, D]``, ``idx/weights [T, k]``, in the
        step's numerics (``kernels``: its mode, and the linears and SwiGLU an expert module runs)."""
        ...


# --------------------------------------------------------------------------------------------------
# Kernels and numerics
# --------------------------------------------------------------------------------------------------
#: How a step computes. "autograd": training (gradients flow); "inference": no autograd, any
#: arithmetic that is fast and accurate; "batch_invariant": a row's numbers do not depend on the rows
#: that share its step (true on-policy RL), with or without autograd.
StepMode = Literal["autograd", "inference", "batch_invariant"]
STEP_MODES: tuple[StepMode, ...] = ("autograd", "inference", "batch_invariant")


class LinearWeights(Protocol):
    """What a kernel set reads from a linear layer, ``y = x @ W^T`` without bias.

    ``W`` is the rows of ``weights`` stacked (one weight, or several projections of the same input
    computed as one product); ``cache`` keeps what a kernel set derives from them (the stacked copy,
    packed or quantised forms), keyed by what it is and checked against the weights' versions.
    """

    @property
    def weights(self) -> Sequence[torch.Tensor]: ...  # noqa: D102  each [N_i, K]
    @property
    def cache(self) -> dict[str, Any]: ...  # noqa: D102


@runtime_checkable
class KernelSet(Protocol):
    """The model's hot ops for one :data:`StepMode`: linears, norms, rope, mHC, the router, SwiGLU.

    The model calls these and nothing else for its arithmetic, so a hardware plugin replaces them all
    at once and model code has no backend, device or mode branch. A class serves the modes named in
    its ``capabilities`` (besides features such as ``"cpu"``/``"cuda"``) and is built per mode as
    ``cls(config, device, mode, max_context=None, options={})``: ``max_context`` is the longest
    sequence a batch-invariant step will hold (attention sizes its gathers for it), ``options`` the
    engine's settings (e.g. ``native_kernels``), for the sets that read any. The model picks the
    instance for each step (:class:`dsv4.core.numerics.KernelChoice`) and hands it to the attention
    backend's plan and the expert executor, so they follow the same mode.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]
    mode: StepMode
    max_context: int | None

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device, mode: StepMode) -> str | None:
        """``None`` if this kernel set can compute ``config`` on ``device`` in ``mode``, else the reason."""
        ...

    def linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """``x [..., K] @ W^T`` -> ``[..., ΣN_i]``."""
        ...

    def grouped_linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """Per-group products: ``x [T, g, K]`` with ``W [g·R, K]`` -> ``[T, g, R]``."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """``weight · x · rsqrt(mean(x²) + eps)`` over the last dim, in fp32 (``weight=None``: no scale)."""
        ...

    def rope_cis(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations ``[..., rd/2]`` (complex64) of integer ``positions [...]``."""
        ...

    def rope(self, x: torch.Tensor, cis: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """Rotate the trailing ``2·cis.shape[-1]`` channels of ``x [N, ..., d]`` as interleaved pairs by
        ``cis [N, rd/2]`` (``inverse``: the conjugate rotation)."""
        ...

    def hc_pre(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
        *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC collapse of streams ``h [T, n, D]``: the sublayer input ``[T, D]``, ``post [T, n]`` and the
        Sinkhorn-normalised ``comb [T, n, n]``."""
        ...

    def hc_post(self, f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams ``X'_k = post_k · f + Σ_j comb[j, k] · X_j`` -> ``[T, n, D]``."""
        ...

    def hc_head(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, rms_eps: float,
        hc_eps: float,
    ) -> torch.Tensor:
        """Final collapse of the streams ``h [T, n, D] -> [T, D]`` (no post, no comb)."""
        ...

    def router_scores(self, x: torch.Tensor, weight: torch.Tensor, score_func: str) -> torch.Tensor:
        """The router's affinities ``[T, E]`` (fp32) of ``x [T, D]`` for ``weight [E, D]``: ``sqrt(softplus)``,
        ``sigmoid`` or ``softmax`` of the logits (what :meth:`route` selects from; the balance loss reads them)."""
        ...

    def route(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, imposed: torch.Tensor | None,
        *, score_func: str, top_k: int, route_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE routing of ``x [T, D]``: combine weights and expert ids ``[T, k]``. Ids are the top-k of
        ``scores + bias``; ``imposed [T, k]`` replaces them on rows whose first id is >= 0 (hash routing,
        where ``bias`` is None and every row is imposed, and routing replay)."""
        ...

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
        """``silu(min(gate, L)) · clamp(up, -L, L)``; no clamping when ``L <= 0``."""
        ...

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits [N, V])[i, tokens[i]]`` (rollouts and the trainer use the same)."""
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
class SequenceStatus(enum.Enum):
    """Where a sequence is in its life; the scheduler moves it along."""

    WAITING = "waiting"  # holds no KV pages (new, or preempted: recomputed from scratch)
    RUNNING = "running"  # its KV is (partly) in the pool
    FINISHED = "finished"


class ScheduledSequence(Protocol):
    """What a scheduler reads and writes on a sequence (the engine's ``Sequence``)."""

    @property
    def seq_id(self) -> int: ...  # noqa: D102  its request id in the KV pool
    @property
    def request_id(self) -> str: ...  # noqa: D102  the request it samples (abort drops all its sequences)
    @property
    def arrival(self) -> tuple[int, int]: ...  # noqa: D102  (request arrival order, sample index)
    @property
    def num_tokens(self) -> int: ...  # noqa: D102  prompt plus generated tokens
    @property
    def num_lookahead(self) -> int: ...  # noqa: D102  draft tokens after those a step may verify (speculative decoding)

    num_computed: int  # tokens whose KV is in the pool; a scheduler preempting the sequence sets it to 0
    status: SequenceStatus


SeqT = TypeVar("SeqT", bound=ScheduledSequence)


@dataclass(slots=True)
class ScheduledBatch(Generic[SeqT]):
    """One step's work: each sequence with how many of its uncomputed tokens run now (its pages for them
    reserved), and the sequences preempted to make room (they hold no pages and wait to be recomputed)."""

    items: list[tuple[SeqT, int]] = field(default_factory=list)
    preempted: list[SeqT] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """New tokens in the step."""
        return sum(n for _, n in self.items)


@runtime_checkable
class Scheduler(Protocol[SeqT]):
    """Decides which sequences run in the next step and how many new tokens each contributes.

    A sequence holds pages in the pool only while it runs: :meth:`schedule` reserves them, preemption,
    :meth:`finish` and :meth:`abort` free them. ``dsv4.testing.contracts.check_scheduler`` checks the
    rules on random request streams.
    """

    name: ClassVar[str]
    # e.g. {"chunked_prefill", "preemption", "fork"}. "chunked_prefill": may split a prompt over steps
    # (when built with chunked_prefill=True); "preemption": may free a running sequence's pages when the
    # pool runs out; "fork": an AdoptingScheduler.
    capabilities: ClassVar[frozenset[str]]

    def __init__(self, pool: KVPool, *, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool) -> None:
        """Schedule into ``pool``: at most ``max_num_seqs`` sequences running and ``max_num_batched_tokens``
        new tokens a step; a prompt is cut into chunks only with ``chunked_prefill``."""
        ...

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """``None`` if this scheduler accepts ``options`` (the engine's, unknown keys ignored), else the reason."""
        ...

    def add(self, seq: SeqT) -> None:
        """Queue a sequence that holds no pages (status WAITING)."""
        ...

    def schedule(self) -> ScheduledBatch[SeqT]:
        """The next step's work within both limits, each sequence once (status RUNNING) with ``n`` new
        tokens, ``1 <= n <=`` its uncomputed ones (all of them without chunked prefill) plus its
        ``num_lookahead`` draft tokens (a speculating sequence: what the step verifies of them; a scheduler
        may always leave them out). Empty only when nothing waits or runs, or the pool cannot hold a
        single sequence."""
        ...

    def finish(self, seq: SeqT) -> None:
        """Take an ended sequence out of scheduling and free its pages (status FINISHED)."""
        ...

    def abort(self, request_id: str) -> list[SeqT]:
        """Drop every unfinished sequence of ``request_id`` as :meth:`finish` does; returns them."""
        ...

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        ...


@runtime_checkable
class AdoptingScheduler(Scheduler[SeqT], Protocol[SeqT]):
    """A :class:`Scheduler` with the ``"fork"`` capability: it runs samples given a copy of their prompt's cache."""

    def adopt(self, seq: SeqT) -> bool:
        """Run ``seq``, which holds pages for its ``num_computed`` tokens, from the next step on;
        ``False`` (nothing changed) when the running set is full."""
        ...


def can_adopt(scheduler: Scheduler[SeqT]) -> TypeGuard[AdoptingScheduler[SeqT]]:
    """Whether ``scheduler`` declares the ``"fork"`` capability, and so is an :class:`AdoptingScheduler`."""
    return "fork" in scheduler.capabilities


@runtime_checkable
class ResumingScheduler(Scheduler[SeqT], Protocol[SeqT]):
    """A :class:`Scheduler` with the ``"prefix_cache"`` capability: a waiting sequence may resume from a
    cached prefix instead of computing its tokens from the first."""

    #: Set by the engine. Called on a waiting sequence that holds no pages just before the scheduler
    #: admits it: it may give the sequence the pages of a cached prefix and set ``num_computed`` to
    #: that prefix's length. When the sequence then cannot be admitted, the scheduler releases its
    #: pages and sets ``num_computed`` back to 0 (a waiting sequence holds no pages).
    resume: Callable[[SeqT], None] | None


def can_resume(scheduler: Scheduler[SeqT]) -> TypeGuard[ResumingScheduler[SeqT]]:
    """Whether ``scheduler`` declares the ``"prefix_cache"`` capability (a :class:`ResumingScheduler`)."""
    return "prefix_cache" in scheduler.capabilities


#: The interfaces by the hook-friendly kind name used in the registry.
INTERFACES: dict[str, type[Any]] = {
    "attention_backend": AttentionBackend,
    "kv_pool": KVPool,
    "expert_executor": ExpertExecutor,
    "verifier": Verifier,
    "scheduler": Scheduler,
    "kernel_set": KernelSet,
}
