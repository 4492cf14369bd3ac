"""The prefix cache's radix tree against a plain list of checkpoints, and its pool bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dsv4.cache.paged import PagedKVPool, PoolExhausted
from dsv4.cache.prefix import PrefixCache
from dsv4.core.kv import StreamSpec

STREAMS = [
    StreamSpec("win", 2, (0, 1), keep=5),
    StreamSpec("c4.rows", 4, (1,), keep=4, align=4),
    StreamSpec("c4.ent", 2, (1,), ratio=4),
]

# Few distinct tokens: prompts share prefixes of every length and edges split everywhere.
TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=14)


class CacheMachine(RuleBasedStateMachine):
    """Insert, match, resume, evict and flush in any order; compared with a dict of checkpointed prefixes."""

    @initialize(pages=st.integers(4, 40), min_tokens=st.integers(1, 4))
    def setup(self, pages: int, min_tokens: int) -> None:
        self.pool = PagedKVPool(STREAMS, {s.name: pages for s in STREAMS}, page_size=2)
        self.cache = PrefixCache(self.pool, min_tokens=min_tokens)
        self.pool.reclaimer = self.cache.evict_one
        self.model: dict[tuple[int, ...], int] = {}  # prefix -> holder
        self.next_rid = 0

    def _request(self, tokens: list[int]) -> int | None:
        """A pool request that has computed ``tokens``; None when the pool has no room (even after evictions)."""
        rid = self.next_rid
        self.next_rid += 1
        try:
            self.pool.reserve(rid, len(tokens))
        except PoolExhausted:
            return None
        finally:
            self._forget_evicted()  # making room evicts checkpoints
        return rid

    def _forget_evicted(self) -> None:
        held = {c.holder for c in self.cache.checkpoints}
        self.model = {k: h for k, h in self.model.items() if h in held}

    @rule(tokens=TOKENS)
    def insert(self, tokens: list[int]) -> None:
        rid = self._request(tokens)
        if rid is None:
            return
        ckpt = self.cache.insert(rid, tokens)
        self._forget_evicted()
        if ckpt is not None:
            assert ckpt.depth == len(tokens)
            self.model[tuple(tokens)] = ckpt.holder
        else:
            assert len(tokens) < self.cache.min_tokens or tuple(tokens) not in self.model
        self.pool.release(rid)

    @rule(data=st.data(), more=TOKENS, shift=st.integers(-2, 2))
    def match_near_a_checkpoint(self, data: st.DataObject, more: list[int], shift: int) -> None:
        """A prompt that extends a cached prefix, with a limit just around its length."""
        if self.model:
            known = list(data.draw(st.sampled_from(sorted(self.model))))
            self.match_and_resume(known + more, max(0, len(known) + shift))

    @rule(tokens=TOKENS, cut=st.integers(0, 14))
    def match_and_resume(self, tokens: list[int], cut: int) -> None:
        limit = min(cut, len(tokens))
        want = max((k for k in self.model if len(k) <= limit and tuple(tokens[: len(k)]) == k), key=len, default=None)
        got = self.cache.match(tokens, limit)
        assert (got.holder if got else None) == (self.model[want] if want is not None else None)
        rid = self.next_rid
        self.next_rid += 1
        resumed = self.cache.resume(rid, tokens, limit)
        self._forget_evicted()
        if resumed is not None:
            assert resumed.holder in self.model.values()  # not evicted to make room for its own copy
            assert want is not None and resumed.depth == len(want)
            self.pool.release(rid)

    @rule()
    def evict_one(self) -> None:
        before = self.cache.num_checkpoints
        assert self.cache.evict_one() == (before > 0)
        self._forget_evicted()

    @rule()
    def flush(self) -> None:
        self.cache.flush()
        self.model.clear()
        for s in STREAMS:
            assert self.pool.pages_used(s.name) == 0

    @invariant()
    def tree_is_exact(self) -> None:
        """Every checkpoint sits at a node whose path spells its prefix; nodes without a checkpoint lead to one
        and branch (no bare chains); cached tokens are the distinct prefixes' trie size."""
        assert {c.holder for c in self.cache.checkpoints} == set(self.model.values())
        todo = [(self.cache.root, ())]
        seen = 0
        while todo:
            node, path = todo.pop()
            assert len(path) == node.depth
            if node.checkpoint is not None:
                assert self.model[path] == node.checkpoint.holder
                seen += 1
            elif node.parent is not None:
                assert len(node.children) >= 2
            for first, child in node.children.items():
                assert child.edge[0] == first and child.parent is node
                todo.append((child, path + child.edge))
        assert seen == len(self.model)
        trie = {k[:i] for k in self.model for i in range(1, len(k) + 1)}
        assert self.cache.cached_tokens() == len(trie)

    @invariant()
    def only_checkpoints_hold_pages(self) -> None:
        holders = set(self.model.values())
        for s in STREAMS:
            assert set(self.pool.owners(s.name)) <= holders  # every request released: only checkpoints remain
            assert self.cache.pages(s.name) == self.pool.pages_used(s.name)


TestCache = CacheMachine.TestCase
TestCache.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_lru_order_and_pinned_checkpoints() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 64 for s in STREAMS}, page_size=2)
    cache = PrefixCache(pool, min_tokens=2)
    for rid, tokens in enumerate(([1, 2, 3], [1, 2, 4, 5], [7, 7])):
        pool.reserve(rid, len(tokens))
        cache.insert(rid, tokens)
        pool.release(rid)
    first = cache.match([1, 2, 3, 9])
    assert first is not None and first.depth == 3
    assert cache.resume(10, [1, 2, 3, 9], 3) is first  # used: now the most recent
    assert [c.depth for c in cache.checkpoints] == [4, 2, 3]
    cache._pinned.add(cache.checkpoints[0].holder)
    assert cache.evict_one() and [c.depth for c in cache.checkpoints] == [4, 3]
    assert cache.stats.hits == 1 and cache.stats.hit_tokens == 3 and cache.stats.evictions == 1


def test_short_prefixes_are_not_checkpointed() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 8 for s in STREAMS}, page_size=2)
    cache = PrefixCache(pool, min_tokens=4)
    pool.reserve(0, 3)
    assert cache.insert(0, [1, 2, 3]) is None and cache.num_checkpoints == 0
    assert cache.match([1, 2, 3, 4]) is None


@pytest.mark.parametrize("at", [5, 8, 11])
def test_a_resumed_request_reads_the_checkpoints_rows(at: int) -> None:
    """The rows a request of ``at`` tokens reads, as a checkpoint taken mid-step has them, reach a
    request resumed from it; the source then goes on writing without touching them."""
    pool = PagedKVPool(STREAMS, {s.name: 32 for s in STREAMS}, page_size=2)
    cache = PrefixCache(pool, min_tokens=1)
    pool.reserve(0, 12)
    for s in STREAMS:
        for layer in s.layers:
            rows = list(range(s.length(12)))
            pool.buffer(layer, s.name)[pool.slots(s.name, [0], _t([0] * len(rows)), _t(rows))] = _t(rows).float()[:, None]
    ckpt = cache.insert(0, list(range(at)))
    assert ckpt is not None
    pool.release(0)  # the source finishes
    assert cache.resume(1, list(range(20)), 19) is ckpt
    for s in STREAMS:
        rows = list(range(s.keep_from(at), s.length(at)))
        for layer in s.layers:
            got = pool.buffer(layer, s.name)[pool.slots(s.name, [1], _t([0] * len(rows)), _t(rows)), 0]
            assert got.tolist() == [float(r) for r in rows], (s.name, layer)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
