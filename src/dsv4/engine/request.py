"""A request and the sequences it generates, as the scheduler and the engine see them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dsv4.core.interfaces import RoutingTrace, SequenceStatus
from dsv4.engine.detok import IncrementalDetokenizer, StopChecker
from dsv4.engine.grammar import SequenceGrammar
from dsv4.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, Routing
from dsv4.engine.sampling import SamplingParams, SequenceSampling

__all__ = ["Request", "Sequence", "SequenceStatus"]


@dataclass(eq=False)
class Sequence:
    """One generated sequence; its KV pool id is ``seq_id``. A request with ``n > 1`` has several.

    A :class:`~dsv4.core.interfaces.ScheduledSequence`: what a scheduler reads and writes.
    """

    seq_id: int
    request: Request
    index: int
    sampling: SequenceSampling
    detok: IncrementalDetokenizer | None
    stop: StopChecker | None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pool
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)  # with EngineConfig.return_token_logprobs
    # with EngineConfig.record_routing: per step that computed rows of this sequence, the step's record
    # and the rows (start, count) that are this sequence's, in order; cut out once, when it finishes
    routing_log: list[tuple[RoutingTrace, int, int]] = field(default_factory=list)
    text: str = ""  # streamed-safe text so far (no partial UTF-8, no half stop string)
    grammar: SequenceGrammar | None = None  # structured output's matcher; None when unconstrained
    # Speculative decoding (dsv4.engine.speculative): tokens the MTP block drafted after the last one,
    # which the next step verifies; positions whose MTP window row is written; the main model's streams
    # [n, D] at position num_computed - 1 (the MTP row there needs them once the next token is known).
    draft_ids: list[int] = field(default_factory=list)
    mtp_computed: int = 0
    frontier: torch.Tensor | None = None

    @property
    def num_lookahead(self) -> int:
        """Draft tokens after :attr:`num_tokens` that the next step may verify along with them."""
        return len(self.draft_ids)

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def arrival(self) -> tuple[int, int]:
        """Its place in arrival order: the request's, then the sample's index."""
        return self.request.arrival_order, self.index

    @property
    def prompt_ids(self) -> list[int]:
        """The request's prompt."""
        return self.request.prompt_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.request.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        """Token ``i`` of prompt + output."""
        n = len(self.request.prompt_ids)
        return self.request.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + output."""
        n = len(self.request.prompt_ids)
        if stop <= n:
            return self.request.prompt_ids[start:stop]
        return (self.request.prompt_ids[start:] if start < n else []) + self.output_ids[max(0, start - n) : stop - n]

    @property
    def finished(self) -> bool:
        """Whether the sequence has ended."""
        return self.status is SequenceStatus.FINISHED

    def completion(self) -> CompletionOutput:
        """This sequence as an output object (a snapshot)."""
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            token_logprobs=list(self.token_logprobs) if self.token_logprobs else None,
            routing=self._routing() if self.finished and self.routing_log else None,
        )

    def _routing(self) -> Routing:
        # Every token's but the last: a sequence ends before computing its last token, except when that
        # token was a verified draft (speculative decoding), whose row is then left out alike.
        log, rows = self.routing_log, self.num_tokens - 1
        return Routing(
            experts={k: torch.cat([t.experts[k][s : s + n] for t, s, n in log])[:rows] for k in log[0][0].experts},
            indexer={k: torch.cat([t.indexer[k][s : s + n] for t, s, n in log])[:rows] for k in log[0][0].indexer},
        )


@dataclass(eq=False)
class Request:
    """A prompt with its sampling parameters, producing ``params.n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival_order: int
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival=time.monotonic()))
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False

    @property
    def finished(self) -> bool:
        """All sequences have ended."""
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """The request's state as an output object (a snapshot)."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
        )
