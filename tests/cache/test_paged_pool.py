"""Property tests of the paged KV pool: no page leaked, every page's holder count exact, live rows stay
addressable and keep their values while other holders share and extend the same prefix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsv4.cache.paged import PagedKVPool, PoolExhausted
from dsv4.core.kv import StreamSpec

STREAMS = [
    StreamSpec("win", 3, (0, 1, 2), keep=6),  # sliding window of 7
    StreamSpec("c4.rows", 8, (1,), keep=4, align=4),  # overlapping compressor state
    StreamSpec("c4.ent", 2, (1,), ratio=4),  # compressed entries: never freed
    StreamSpec("c8.ent", 2, (2,), ratio=8),
]


class PoolMachine(RuleBasedStateMachine):
    """add / extend / finish / preempt in any order, as the scheduler does."""

    @initialize(page_size=st.sampled_from([1, 2, 4, 16]), pages=st.integers(3, 24))
    def setup(self, page_size: int, pages: int) -> None:
        self.pool = PagedKVPool(STREAMS, {s.name: pages for s in STREAMS}, page_size=page_size)
        self.total = {s.name: self.pool.pages_free(s.name) for s in STREAMS}
        self.lengths: dict[int, int] = {}
        self.rows: dict[tuple[int, str, int], float] = {}  # (rid, stream, row) -> value written

    @rule(rid=st.integers(0, 11), n=st.integers(1, 40), data=st.data())
    def extend(self, rid: int, n: int, data: st.DataObject) -> None:
        """add (new rid) or extend a request by n tokens, write its new rows, drop what it no longer reads.
        Before it drops them, another request may share its cache at any point the step computed (a
        prefix-cache checkpoint taken mid-chunk)."""
        old = self.lengths.get(rid, 0)
        try:
            self.pool.reserve(rid, old + n)
        except PoolExhausted:
            return  # the pool must be unchanged: checked by the invariants
        self.lengths[rid] = old + n
        for s in STREAMS:
            rows = torch.arange(s.length(old), s.length(old + n))
            if rows.numel():
                slots = self.pool.slots(s.name, [rid], torch.zeros_like(rows), rows)
                for layer in s.layers:
                    buf = self.pool.buffer(layer, s.name)
                    buf[slots] = (rid * 1000 + rows).float().unsqueeze(1).expand(-1, s.width)
                for r in rows.tolist():
                    self.rows[(rid, s.name, r)] = rid * 1000 + r
        dst = data.draw(st.integers(0, 11))
        if dst not in self.lengths and data.draw(st.booleans()):
            self._share(rid, dst, data.draw(st.integers(max(old, 1), old + n)))
        self.pool.release(rid, old + n)

    def _share(self, src: int, dst: int, at: int) -> None:
        try:
            self.pool.share(src, dst, at)
        except PoolExhausted:
            return  # the pool must be unchanged: checked by the invariants
        self.lengths[dst] = at
        self.rows.update({(dst, s.name, r): self.rows[(src, s.name, r)]
                          for s in STREAMS for r in range(s.keep_from(at), s.length(at))})

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), dst=st.integers(0, 11))
    def share_all(self, data: st.DataObject, dst: int) -> None:
        """A request shares another's whole cache (prompt sharing, a checkpoint resumed)."""
        src = data.draw(st.sampled_from(sorted(self.lengths)))
        if dst not in self.lengths:
            self._share(src, dst, self.lengths[src])

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def finish_or_preempt(self, data: st.DataObject) -> None:
        """A finished and a preempted request both give every page back."""
        rid = data.draw(st.sampled_from(sorted(self.lengths)))
        self.pool.release(rid)
        del self.lengths[rid]
        self.rows = {k: v for k, v in self.rows.items() if k[0] != rid}

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), dsts=st.lists(st.integers(8, 11), min_size=1, max_size=4, unique=True),
          one=st.booleans())
    def fork(self, data: st.DataObject, dsts: list[int], one: bool) -> None:
        """Requests (samples of a prompt prefilled once) start from a copy of another's cache: one at a
        time, or several in one call (all or nothing)."""
        dsts = [d for d in dsts if d not in self.lengths]
        if not dsts or (one and len(dsts) > 1):
            return
        src = data.draw(st.sampled_from(sorted(self.lengths)))
        try:
            self.pool.fork(src, dsts[0] if one else dsts)
        except PoolExhausted:
            return  # the pool must be unchanged: checked by the invariants
        for dst in dsts:
            self.lengths[dst] = self.lengths[src]
            self.rows.update({(dst, s, r): v for (rid, s, r), v in self.rows.items() if rid == src})

    @invariant()
    def pages_conserved(self) -> None:
        for s in STREAMS:
            assert self.pool.pages_used(s.name) + self.pool.pages_free(s.name) == self.total[s.name]

    @invariant()
    def holder_counts_are_exact(self) -> None:
        """A page is in as many page tables as its count says, at most once in each; free exactly at 0."""
        for s in STREAMS:
            owners = self.pool.owners(s.name)
            counts: dict[int, int] = {}
            for pages in owners.values():
                assert len(pages) == len(set(pages))
                for p in pages:
                    counts[p] = counts.get(p, 0) + 1
            assert 0 not in counts  # the null page is never handed out
            assert set(owners) <= set(self.lengths)
            for page in range(1, self.total[s.name] + 1):
                assert self.pool.holders(s.name, page) == counts.get(page, 0)
            assert self.pool.pages_used(s.name) == len(counts)

    @invariant()
    def live_rows_keep_their_values(self) -> None:
        for rid, n in self.lengths.items():
            for s in STREAMS:
                rows = torch.arange(s.keep_from(n), s.length(n))
                if not rows.numel():
                    continue
                slots = self.pool.slots(s.name, [rid], torch.zeros_like(rows), rows)
                for layer in s.layers:
                    got = self.pool.buffer(layer, s.name)[slots, 0]
                    want = torch.tensor([self.rows[(rid, s.name, r)] for r in rows.tolist()])
                    assert torch.equal(got, want), (rid, s.name, layer)

    @invariant()
    def expired_pages_are_freed(self) -> None:
        """Every page whose rows a request can no longer read has gone back (window recycling)."""
        for rid, n in self.lengths.items():
            for s in STREAMS:
                if s.keep is None:
                    continue
                live = self.pool._tables[s.name].get(rid, [])
                expired = min(s.keep_from(n) // self.pool.page_size, len(live))
                assert all(page == -1 for page in live[:expired]), (rid, s.name, n, live)

    @invariant()
    def bytes_follow_pages(self) -> None:
        for s in STREAMS:
            assert self.pool.bytes_used(s.name) == self.pool.pages_used(s.name) * self.pool.page_size * s.width * 4 * len(s.layers)


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_window_pages_are_recycled() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 64 for s in STREAMS}, page_size=2)
    for n in range(1, 200):
        pool.reserve(0, n)
        pool.release(0, n)
    assert pool.pages_used("win") <= 5  # keep 6 rows + the newest, in pages of 2
    assert pool.pages_used("c4.rows") <= 5
    assert pool.pages_used("c4.ent") == 199 // 4 // 2 + 1


def test_tables_grown_inside_inference_mode_can_be_released_outside() -> None:
    """The engine reserves inside torch.inference_mode; the server aborts outside it."""
    pool = PagedKVPool(STREAMS, {s.name: 1000 for s in STREAMS}, page_size=1)
    with torch.inference_mode():
        for rid in range(20):  # more requests and pages than the initial tables hold
            pool.reserve(rid, 40)
    for rid in range(20):
        pool.release(rid, 39)
        pool.release(rid)
    assert all(pool.pages_used(s.name) == 0 for s in STREAMS)


def test_many_requests_without_entries_yet() -> None:
    """Requests too short for a compressed entry still have a row in every stream's table."""
    pool = PagedKVPool(STREAMS, {s.name: 64 for s in STREAMS}, page_size=2)
    for rid in range(20):
        pool.reserve(rid, 2)  # no c4/c8 entry yet
    rows = torch.zeros(20, dtype=torch.long)
    slots = pool.slots("c4.ent", list(range(20)), torch.arange(20), rows)
    assert slots.tolist() == [0] * 20  # the null page


def test_fork_rejects_repeated_targets_and_targets_with_pages() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 64 for s in STREAMS}, page_size=2)
    pool.reserve(0, 9)
    pool.reserve(1, 3)
    for bad in ([2, 2], [0, 2], [2, 1]):
        with pytest.raises(ValueError, match="fork"):
            pool.fork(0, bad)
    used = {s.name: pool.pages_used(s.name) for s in STREAMS}
    pool.fork(0, [2, 3, 4])
    assert all(pool.pages_used(n) == used[n] + 3 * len(pool.owners(n)[0]) for n in used)


def test_share_copies_only_the_last_partial_page_and_counts_holders() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 16 for s in STREAMS}, page_size=2)
    pool.reserve(0, 21)
    pool.share(0, 1, 21)
    for s in STREAMS:
        src, dst = pool.owners(s.name)[0], pool.owners(s.name)[1]
        rows = s.length(21)
        full = rows // 2
        first = s.keep_from(21) // 2
        assert dst[: full - first] == src[first:full]  # the full pages: the same ones
        if rows % 2:
            assert dst[-1] not in src  # the partly written page: a copy of its own
        for p in src[first:full]:
            assert pool.holders(s.name, p) == 2
    pool.release(0)
    pool.release(1)
    assert all(pool.pages_used(s.name) == 0 for s in STREAMS)


def test_share_refuses_what_it_cannot_give() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 16 for s in STREAMS}, page_size=2)
    pool.reserve(0, 30)
    pool.release(0, 30)  # the window's old pages are gone
    with pytest.raises(ValueError, match="does not hold the rows of stream 'win'"):
        pool.share(0, 1, 12)
    with pytest.raises(ValueError, match="does not hold"):
        pool.share(0, 1, 31)  # more tokens than it has
    with pytest.raises(ValueError, match="itself"):
        pool.share(0, 0, 30)
    pool.share(0, 1, 30)
    with pytest.raises(ValueError, match="already holds pages"):
        pool.share(0, 1, 30)


def test_a_short_pool_asks_the_reclaimer_before_giving_up() -> None:
    pool = PagedKVPool(STREAMS, {s.name: 6 for s in STREAMS}, page_size=2)
    pool.reserve(-1, 10)  # a holder the reclaimer may give back
    calls = []

    def reclaim() -> bool:
        calls.append(1)
        if -1 in pool.owners("win"):
            pool.release(-1)
            return True
        return False

    pool.reclaimer = reclaim
    pool.reserve(0, 12)  # needs pages only the holder has
    assert calls and -1 not in pool.owners("win")
    with pytest.raises(PoolExhausted):
        pool.reserve(0, 200)  # nothing left to reclaim: refused, pool unchanged
    assert pool.owners("c4.ent")[0] == pool.owners("c4.ent")[0][:3]
