"""FCFS continuous batching with a token budget, chunked prefill and preemption by recompute."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic

from dsv4.core.interfaces import KVPool, ScheduledBatch, ScheduledSequence, SeqT, SequenceStatus

__all__ = ["FCFSScheduler", "ScheduledBatch"]


class FCFSScheduler(Generic[SeqT]):
    """First come, first served; running sequences before waiting ones; every step fits a token budget.

    A step takes each running sequence's next tokens (1 when decoding, a chunk when its prefill did
    not fit earlier; a speculating sequence's drafts too, while the budget and the pool allow), then admits waiting sequences in arrival order while the budget, the sequence
    limit and the KV pool allow. A prefill may be cut anywhere (``chunked_prefill``). When the pool runs
    out of pages for a running sequence, the most recently arrived running sequence is preempted: its
    pages are freed and it waits to be recomputed from scratch, which gives the same tokens.

    With :attr:`resume` set (the engine's prefix cache), a sequence about to be admitted may first be
    given a cached prefix; it then computes only the tokens after it.
    """

    name: ClassVar[str] = "fcfs"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"continuous_batching", "chunked_prefill", "preemption", "fork", "prefix_cache"}
    )

    def __init__(
        self,
        pool: KVPool,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        chunked_prefill: bool = True,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[SeqT] = deque()
        self.running: list[SeqT] = []
        self.resume: Callable[[SeqT], None] | None = None

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """Refuses only nonsensical limits."""
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if key in options and int(options[key]) < 1:
                return f"{key} must be >= 1, got {options[key]}"
        return None

    # ------------------------------------------------------------------------------------------
    def add(self, seq: SeqT) -> None:
        """Queue a sequence in arrival order: a new request's go last, a sample of an earlier request
        that could not share its prompt's cache goes before later arrivals."""
        seq.status = SequenceStatus.WAITING
        if not self.waiting or seq.arrival >= self.waiting[-1].arrival:
            self.waiting.append(seq)
        else:
            self.waiting.insert(bisect.bisect(self.waiting, seq.arrival, key=_arrival), seq)

    def adopt(self, seq: SeqT) -> bool:
        """Run a sequence that already holds its KV cache (a sample given a copy of its prompt's) from
        the next step on, if the running set has room; ``False`` (nothing changed) if it is full."""
        if len(self.running) >= self.max_num_seqs:
            return False
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_arrival)
        return True

    def abort(self, request_id: str) -> list[SeqT]:
        """Drop every sequence of ``request_id``; their pages are freed. Returns them."""
        dropped = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in dropped:
            self.finish(seq)
        return dropped

    def finish(self, seq: SeqT) -> None:
        """Take a sequence out of scheduling and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def has_work(self) -> bool:
        """Whether anything is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences not yet (or no longer) in the pool."""
        return len(self.waiting)

    # ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch[SeqT]:
        """The next step's sequences and token counts."""
        out: ScheduledBatch[SeqT] = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            todo = seq.num_tokens - seq.num_computed
            n = min(todo + seq.num_lookahead, budget)
            fits = self._reserve(seq, n)
            if not fits and n > todo:  # drafts are optional: verify none rather than preempt
                n = min(todo, budget)
                fits = self._reserve(seq, n)
            if fits:
                out.items.append((seq, n))
                budget -= n
                i += 1
                continue
            victim = self.running[-1]  # latest arrival (running is kept in arrival order), not yet scheduled
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.resume is not None and seq.num_computed == 0:
                self.resume(seq)
            todo = seq.num_tokens - seq.num_computed
            if (todo > budget and not self.chunked_prefill) or not self._reserve(seq, min(todo, budget)):
                if seq.num_computed:  # a resumed prefix: waiting sequences hold no pages
                    self.pool.release(seq.seq_id)
                    seq.num_computed = 0
                break
            n = min(todo, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            out.items.append((seq, n))
            budget -= n
        return out

    def _reserve(self, seq: SeqT, n: int) -> bool:
        """Grow the sequence's pages for ``n`` more tokens; False (pool unchanged) if they run out."""
        try:
            self.pool.reserve(seq.seq_id, seq.num_computed + n)
        except MemoryError:
            return False
        return True

    def _preempt(self, seq: SeqT) -> None:
        self.running.remove(seq)
        self.pool.release(seq.seq_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)


def _arrival(seq: ScheduledSequence) -> tuple[int, int]:
    return seq.arrival
