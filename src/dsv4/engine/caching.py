"""The engine's use of the prefix cache: where sequences are checkpointed, how one resumes, when cached
KV is stale. The cache itself (radix tree, pool holders, eviction) is :mod:`dsv4.cache.prefix`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from loguru import logger

from dsv4.cache.prefix import PrefixCache
from dsv4.core.interfaces import KVPool, RoutingTrace, Scheduler, can_resume, can_share
from dsv4.engine.config import EngineConfig
from dsv4.engine.request import Sequence

__all__ = ["SequenceCache"]

# Prefixes shorter than this are not checkpointed (a checkpoint costs a page copy per stream).
MIN_CHECKPOINT = 16

RoutingLog = list[tuple[RoutingTrace, int, int]]


@dataclass(frozen=True, slots=True)
class _Saved:
    """What a checkpoint keeps beside its KV: the routing records of its tokens (with ``record_routing``)
    and the main model's streams at its last token (when speculating: a sequence resuming there writes
    its MTP row at that token, which depends on the token after it)."""

    routing: RoutingLog | None
    frontier: torch.Tensor | None


class SequenceCache:
    """Checkpoints running sequences into a :class:`PrefixCache` and resumes waiting ones from it.

    A sequence is checkpointed where it ends (the next turn of its conversation starts with all of
    it), at its prompt's last token (a resent or extended prompt resumes there), every
    ``window_checkpoint_interval`` tokens, and where it is aborted. Checkpoints carry the routing
    records of their tokens when the engine records routing, so a resumed sequence's records are
    whole. An in-place change of any weight (RL's weight sync) flushes the cache at the next step.
    """

    def __init__(self, cache: PrefixCache, weights: list[torch.Tensor], *, interval: int, record_routing: bool) -> None:
        self.cache = cache
        self.interval = interval
        self.record_routing = record_routing
        self._weights = weights  # a caller that swaps parameter objects calls flush() itself
        self._weights_seen = _weights_version(weights)

    @classmethod
    def build(cls, config: EngineConfig, pool: KVPool, scheduler: Scheduler[Sequence],
              weights: list[torch.Tensor]) -> SequenceCache | None:
        """The cache ``config`` asks for, wired into ``pool`` (evictions) and ``scheduler`` (resumes);
        ``None`` when it is off or the plugins cannot serve one (logged)."""
        if not config.prefix_cache:
            return None
        if not (can_share(pool) and can_resume(scheduler)):
            logger.info("prefix cache off: the {!r} KV pool needs the 'share' capability and the {!r} scheduler "
                        "'prefix_cache'", pool.name, scheduler.name)
            return None
        cache = PrefixCache(pool, min_tokens=MIN_CHECKPOINT)
        pool.reclaimer = cache.evict_one
        self = cls(cache, weights, interval=config.window_checkpoint_interval, record_routing=config.record_routing)
        scheduler.resume = self.resume
        return self

    # ------------------------------------------------------------------------------------------
    def resume(self, seq: Sequence) -> None:
        """The scheduler's hook: a waiting sequence about to run resumes from the deepest checkpoint of
        its tokens (all but the last, which it computes to sample from)."""
        limit = seq.num_tokens - 1
        ckpt = self.cache.resume(seq.seq_id, seq.tokens(0, limit), limit)
        if ckpt is not None:
            saved: _Saved = ckpt.payload
            seq.num_computed = ckpt.depth
            if self.record_routing and saved.routing is not None:
                seq.routing_log = list(saved.routing)
            # Its MTP row at the last cached token is written again, with this sequence's next token.
            seq.frontier = saved.frontier
            seq.mtp_computed = ckpt.depth - (saved.frontier is not None)

    def checkpoint(self, seq: Sequence, at: int, frontier: torch.Tensor | None = None) -> None:
        """Checkpoint ``seq`` after its first ``at`` tokens (it holds every row they leave to read);
        ``frontier``: the main model's streams at token ``at - 1``, if the engine speculates."""
        routing = _routing_prefix(seq.routing_log, at) if self.record_routing else None
        self.cache.insert(seq.seq_id, seq.tokens(0, at), _Saved(routing, frontier))

    def step_computed(self, seq: Sequence, start: int, stop: int,
                      frontier: Callable[[int], torch.Tensor | None] = lambda at: None) -> None:
        """Checkpoints due in a step that computed tokens ``start:stop`` of ``seq``: at every multiple of
        the interval and at the prompt's last token. The sequence still holds the rows of every point in
        ``(start, stop]``: the pool releases only what ``start`` tokens leave behind until the step ends.
        ``frontier(at)``: the streams at token ``at - 1`` (see :meth:`checkpoint`)."""
        points = list(range((start // self.interval + 1) * self.interval, stop + 1, self.interval))
        prompt_end = len(seq.prompt_ids) - 1
        if start < prompt_end <= stop and prompt_end not in points:
            points.append(prompt_end)
        for at in sorted(points):
            self.checkpoint(seq, at, frontier(at))

    def check_weights(self) -> None:
        """Cached KV was computed by the weights the engine had: drop it once they change."""
        version = _weights_version(self._weights)
        if version != self._weights_seen:
            self._weights_seen = version
            if self.cache.num_checkpoints:
                logger.debug("model weights changed: flushing {} prefix-cache checkpoints", self.cache.flush())


def _weights_version(weights: list[torch.Tensor]) -> list[int]:
    """How often each weight was changed in place (and where it lives): differs after any update."""
    return [t.data_ptr() if t.is_inference() else t._version for t in weights]


def _routing_prefix(log: RoutingLog, rows: int) -> RoutingLog:
    """The routing records of a sequence's first ``rows`` tokens."""
    out = []
    for trace, start, n in log:
        if rows <= 0:
            break
        out.append((trace, start, min(n, rows)))
        rows -= n
    return out
