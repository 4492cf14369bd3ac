"""A paged KV pool: fixed-size pages per stream, free lists, per-request page tables.

Every stream (see :class:`~dsv4.core.kv.StreamSpec`) has its own pages, shared by all layers that
have the stream: page ``p`` of stream ``s`` is rows ``p*P … p*P+P-1`` of every such layer's buffer.
Page 0 is never handed out; reads of rows that do not exist (masked by the attention plan) land there.

Pages are reference-counted: :meth:`PagedKVPool.share` gives a second holder (another request, a
prefix-cache checkpoint) the full pages of a prefix without copying them. Rows are written once, when
their token is computed, and never again, so a page whose every row is written can be read by any
number of holders; only a prefix's last page is copied: it may be partly written, and in streams of
one row per token its last row may be written again by each holder (the MTP block's row at a token
depends on the token after it, which differs between the continuations of a prefix).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from dsv4.core.config import ModelConfig
from dsv4.core.device import to_device
from dsv4.core.kv import StreamSpec
from dsv4.native import kernels

__all__ = ["PagedKVPool", "PoolExhausted"]

_FREED = -1


class PoolExhausted(MemoryError):
    """No free page left in a stream; the pool is unchanged."""


class PagedKVPool:
    """Paged storage for every stream of an attention backend's KV layout."""

    name: ClassVar[str] = "paged"
    capabilities: ClassVar[frozenset[str]] = frozenset({"paged", "window_recycling", "fork", "share"})

    def __init__(
        self,
        streams: Sequence[StreamSpec],
        num_pages: Mapping[str, int],
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.streams = {s.name: s for s in streams}
        self.num_pages = {s.name: int(num_pages[s.name]) + 1 for s in streams}  # + the null page 0
        self._buffers = {
            (layer, s.name): torch.zeros(self.num_pages[s.name] * page_size, s.width, dtype=dtype, device=device)
            for s in streams
            for layer in s.layers
        }
        self._free = {name: list(range(n - 1, 0, -1)) for name, n in self.num_pages.items()}
        # Holders of each page (page tables it is in); a page is free exactly when its count is 0.
        self._refs = {name: np.zeros(n, dtype=np.int32) for name, n in self.num_pages.items()}
        # Called when a stream runs short of pages: frees something (a prefix cache evicts a
        # checkpoint) and returns True, or returns False when it has nothing left to give.
        self.reclaimer: Callable[[], bool] | None = None
        self._tables: dict[str, dict[int, list[int]]] = {name: {} for name in self.streams}
        self.device = torch.device(device)
        # The same page tables as arrays (one row per live request, 0 = no page), kept in step with the
        # lists so that slot lookups are one kernel (or a few indexing ops) per step and stream. Kept
        # in numpy, updated without torch dispatch; _pt are torch views of the same memory.
        self._rows: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._pt_np = {name: np.zeros((8, 8), dtype=np.int64) for name in self.streams}
        self._pt = {name: torch.from_numpy(a) for name, a in self._pt_np.items()}
        # Leading pages of each request already released (window recycling frees pages in order).
        self._released: dict[str, dict[int, int]] = {name: {} for name in self.streams}
        self._expiring = [(name, spec) for name, spec in self.streams.items() if spec.keep is not None]
        self._rows_cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        # Off the CPU: the page tables and request rows on the device, uploaded once after they change
        # (a step resolves several slot sets per stream; each would otherwise copy its table again).
        self._pt_device: dict[str, torch.Tensor] = {}
        self._rows_device: torch.Tensor | None = None
        # reserve() and release() run for every request every step; most calls have nothing to do. Per
        # request: the tokens its pages cover in every stream, and the length at which a partial
        # release would next free a page (absent: unknown, take the full path).
        self._covered: dict[int, int] = {}
        self._release_at: dict[int, int] = {}

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Holds any configuration's streams."""
        return None

    @classmethod
    def for_capacity(
        cls,
        streams: Sequence[StreamSpec],
        max_tokens: int,
        max_requests: int,
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVPool:
        """A pool whose every stream fits ``max_tokens`` tokens of context spread over ``max_requests``."""
        pages = {s.name: math.ceil(s.length(max_tokens) / page_size) + max_requests for s in streams}
        return cls(streams, pages, page_size=page_size, dtype=dtype, device=device)

    # ------------------------------------------------------------------------------------------
    def reserve(self, rid: int, num_tokens: int) -> None:
        """Allocate pages so every stream of ``rid`` addresses the rows of ``num_tokens`` tokens."""
        if num_tokens <= self._covered.get(rid, -1):
            return
        need: dict[str, int] = {}
        for name, spec in self.streams.items():
            have = len(self._tables[name].get(rid, ()))
            want = math.ceil(spec.length(num_tokens) / self.page_size)
            if want > have:
                need[name] = want - have
        short = self._make_room(need)
        if short is not None:
            raise PoolExhausted(
                f"stream {short!r}: request {rid} needs {need[short]} more pages, {len(self._free[short])} free"
            )
        row = self._row_of(rid)
        for name, extra in need.items():
            table = self._tables[name].setdefault(rid, [])
            first = len(table)
            table.extend(self._take(name) for _ in range(extra))
            pt = self._grow(name, row + 1, len(table))
            pt[row, first : len(table)] = table[first:]
        if need:
            self._release_at.pop(rid, None)  # a stream may have its first pages now
        self._note_covered(rid)

    def _note_covered(self, rid: int) -> None:
        # n tokens need ceil((n // ratio) / P) pages: covered while n < (pages · P + 1) · ratio
        self._covered[rid] = min((len(self._tables[name].get(rid, ())) * self.page_size + 1) * spec.ratio - 1
                                 for name, spec in self.streams.items())

    def _make_room(self, need: Mapping[str, int]) -> str | None:
        """Ask the reclaimer for pages until every stream has ``need[stream]`` free; the first stream
        still short when it has nothing left to give, or ``None``."""
        while True:
            short = next((name for name, k in need.items() if k > len(self._free[name])), None)
            if short is None or self.reclaimer is None or not self.reclaimer():
                return short

    def _take(self, stream: str) -> int:
        page = self._free[stream].pop()
        self._refs[stream][page] = 1
        return page

    def _drop(self, stream: str, page: int) -> None:
        """One holder fewer for ``page``; free once it has none."""
        refs = self._refs[stream]
        refs[page] -= 1
        if refs[page] == 0:
            self._free[stream].append(page)

    def slots(self, stream: str, rids: Sequence[int], req: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Physical rows of ``(rids[req], logical)``; rows outside a request's pages map to page 0."""
        key = tuple(rids)
        if self._rows_cache is None or self._rows_cache[0] != key:
            rows = [self._rows.get(r, -1) for r in rids]
            self._rows_cache = (key, torch.tensor(rows, dtype=torch.long))
            self._rows_device = None
        rows_t = self._rows_cache[1]
        pt = self._pt[stream]
        if logical.device.type == "cpu" and req.dtype == logical.dtype == torch.int64 and kernels.supports():
            found = kernels.slots(req, logical, rows_t, pt, self.page_size)
            if found is not None:
                return found
        if logical.device.type != "cpu":
            rows_t, pt = self._on_device(stream, logical.device)
        page = (logical // self.page_size).clamp(max=pt.shape[1] - 1)
        # A request without pages (row -1) reads the null page; so does one past its last page.
        table_rows = rows_t[req]
        pages = torch.where(table_rows >= 0, pt[table_rows.clamp(min=0), page], 0)
        return pages * self.page_size + logical % self.page_size

    def _on_device(self, stream: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The request rows of the cached rids and ``stream``'s page table on ``device``, each uploaded
        once after it changed (every change to a table goes through :meth:`_grow` or :meth:`release`)."""
        assert self._rows_cache is not None
        rows = self._rows_device
        if rows is None or rows.device != device:
            rows = self._rows_device = to_device(self._rows_cache[1], device)
        pt = self._pt_device.get(stream)
        if pt is None or pt.device != device:
            pt = self._pt_device[stream] = to_device(self._pt[stream], device)
        return rows, pt

    def buffer(self, layer_id: int, stream: str) -> torch.Tensor:
        """Storage ``[num_slots, width]`` of ``stream`` in layer ``layer_id``."""
        return self._buffers[(layer_id, stream)]

    def release(self, rid: int, num_tokens: int | None = None) -> None:
        """Free what a request of ``num_tokens`` tokens will not read again (``None``: everything)."""
        # Called for every running request every step: a partial release only concerns streams
        # whose old rows expire (a window, open compression blocks), and only once a page expires.
        if num_tokens is not None and num_tokens < self._release_at.get(rid, 0):
            return
        streams = self.streams.items() if num_tokens is None else self._expiring
        for name, spec in streams:
            table = self._tables[name].get(rid)
            if table is None:
                continue
            row = self._rows[rid]
            released = self._released[name]
            if num_tokens is None:
                for p in reversed(table):
                    if p != _FREED:
                        self._drop(name, p)
                del self._tables[name][rid]
                released.pop(rid, None)
                self._pt_np[name][row] = 0
                self._pt_device.pop(name, None)
                continue
            whole_pages = min(spec.keep_from(num_tokens) // self.page_size, len(table))
            for k in range(released.get(rid, 0), whole_pages):
                if table[k] != _FREED:
                    self._drop(name, table[k])
                    table[k] = _FREED
                    self._pt_np[name][row, k] = 0
                    self._pt_device.pop(name, None)
            if whole_pages > released.get(rid, 0):
                released[rid] = whole_pages
        if num_tokens is None:
            self._covered.pop(rid, None)
            self._release_at.pop(rid, None)
            if rid in self._rows:
                self._free_rows.append(self._rows.pop(rid))
                self._rows_cache = None
        else:
            self._release_at[rid] = self._next_release(rid)

    def _next_release(self, rid: int) -> int:
        """The fewest tokens at which a partial release of ``rid`` frees a page: page k of a stream
        expires once ``keep_from(n) >= (k + 1) · P``, i.e. once ``n`` reaches the next multiple of
        ``align`` from ``(k + 1) · P · ratio + keep``."""
        at = sys.maxsize  # no expiring stream has pages: reserve() resets this when one gets some
        for name, spec in self._expiring:
            if rid in self._tables[name]:
                assert spec.keep is not None
                k = self._released[name].get(rid, 0)
                at = min(at, -(-((k + 1) * self.page_size * spec.ratio + spec.keep) // spec.align) * spec.align)
        return at

    def fork(self, src: int, dst: int | Sequence[int]) -> None:
        """Give ``dst`` (one request id or several, none holding pages) a copy of ``src``'s cache: in every
        stream, pages of its own holding the same rows in every layer, and the same released prefix.
        All or nothing: raises :class:`PoolExhausted` (pool unchanged) when a stream lacks the pages."""
        dsts = [dst] if isinstance(dst, int) else list(dst)
        if len(set(dsts)) != len(dsts) or src in dsts:
            raise ValueError(f"fork: targets {dsts} repeat, or include the source {src}")
        for d in dsts:
            if any(d in tables for tables in self._tables.values()):
                raise ValueError(f"fork: request {d} already holds pages")
        need = {name: sum(p != _FREED for p in self._tables[name].get(src, ())) * len(dsts) for name in self.streams}
        short = self._make_room(need)
        if short is not None:
            raise PoolExhausted(f"stream {short!r}: forking request {src} {len(dsts)} times needs "
                                f"{need[short]} pages, {len(self._free[short])} free")
        rows = [self._row_of(d) for d in dsts]
        lane = torch.arange(self.page_size)
        for name, spec in self.streams.items():
            table = self._tables[name].get(src)
            if table is None:
                continue
            src_pages, dst_pages = [], []
            for d, row in zip(dsts, rows, strict=True):
                copy = [_FREED if p == _FREED else self._take(name) for p in table]
                self._tables[name][d] = copy
                if src in self._released[name]:
                    self._released[name][d] = self._released[name][src]
                pt = self._grow(name, row + 1, len(copy))
                pt[row, : len(copy)] = [0 if p == _FREED else p for p in copy]
                for a, b in zip(table, copy, strict=True):
                    if a != _FREED:
                        src_pages.append(a)
                        dst_pages.append(b)
            if src_pages:  # one gather and one scatter per layer for every target at once
                src_rows = (torch.tensor(src_pages).unsqueeze(1) * self.page_size + lane).flatten()
                dst_rows = (torch.tensor(dst_pages).unsqueeze(1) * self.page_size + lane).flatten()
                src_rows, dst_rows = to_device(src_rows, self.device), to_device(dst_rows, self.device)  # once, not per layer
                for layer in spec.layers:
                    buf = self._buffers[(layer, name)]
                    buf[dst_rows] = buf[src_rows]

    def share(self, src: int, dst: int, num_tokens: int) -> None:
        """Give ``dst`` (holding no pages) the rows a request of ``num_tokens`` tokens reads, as ``src``
        holds them: in every stream, ``src``'s full pages of those rows become ``dst``'s too (one more
        holder each, no copy), and the last page (partly written, or holding the last token's row in a
        stream of one row per token) is copied into a page of ``dst``'s own, so that each goes on writing
        its own rows. ``src`` must have computed at least ``num_tokens``
        tokens and still hold every row a request of ``num_tokens`` tokens reads (a checkpoint taken
        at ``num_tokens``, or a running request that has not released past it). All or nothing:
        raises :class:`PoolExhausted` (pool unchanged) when a stream lacks a page for the copy."""
        if src == dst:
            raise ValueError(f"share: request {src} cannot share with itself")
        if any(dst in tables for tables in self._tables.values()):
            raise ValueError(f"share: request {dst} already holds pages")
        P = self.page_size
        spans: dict[str, tuple[int, int]] = {}  # stream -> its pages [first, last) that dst reads
        need: dict[str, int] = {}
        for name, spec in self.streams.items():
            rows = spec.length(num_tokens)
            if rows == 0:
                continue
            first, last = spec.keep_from(num_tokens) // P, -(-rows // P)
            table = self._tables[name].get(src, [])
            if last > len(table) or _FREED in table[first:last]:
                raise ValueError(f"share: request {src} does not hold the rows of stream {name!r} that a request "
                                 f"of {num_tokens} tokens reads")
            spans[name] = (first, last)
            need[name] = int(rows % P != 0 or spec.ratio == 1)
        short = self._make_room(need)
        if short is not None:
            raise PoolExhausted(f"stream {short!r}: sharing {num_tokens} tokens of request {src} needs a page, none free")
        row = self._row_of(dst)
        lane = torch.arange(P)
        for name, (first, last) in spans.items():
            table = self._tables[name][src]
            mine = [_FREED] * first
            for k in range(first, last - need[name]):
                self._refs[name][table[k]] += 1
                mine.append(table[k])
            if need[name]:  # the partly written last page: a copy, in every layer that has the stream
                page = self._take(name)
                src_rows = to_device(table[last - 1] * P + lane, self.device)
                dst_rows = to_device(page * P + lane, self.device)
                for layer in self.streams[name].layers:
                    buf = self._buffers[(layer, name)]
                    buf[dst_rows] = buf[src_rows]
                mine.append(page)
            self._tables[name][dst] = mine
            if first:
                self._released[name][dst] = first
            pt = self._grow(name, row + 1, len(mine))
            pt[row, : len(mine)] = [0 if p == _FREED else p for p in mine]
        self._release_at.pop(dst, None)
        self._note_covered(dst)

    def _row_of(self, rid: int) -> int:
        if rid not in self._rows:
            row = self._free_rows.pop() if self._free_rows else len(self._rows)
            for name in self.streams:  # every stream's table has the row, pages or not
                self._grow(name, row + 1, 1)
            self._rows[rid] = row
            self._rows_cache = None
        return self._rows[rid]

    def _grow(self, stream: str, rows: int, cols: int) -> np.ndarray:
        """``stream``'s page table with room for ``rows`` x ``cols``, for the caller to write."""
        self._pt_device.pop(stream, None)
        pt = self._pt_np[stream]
        if rows > pt.shape[0] or cols > pt.shape[1]:  # each dimension doubles only when it is too small
            shape = [n if need <= n else max(need, 2 * n) for need, n in ((rows, pt.shape[0]), (cols, pt.shape[1]))]
            bigger = np.zeros(shape, dtype=np.int64)
            bigger[: pt.shape[0], : pt.shape[1]] = pt
            self._pt_np[stream] = pt = bigger
            self._pt[stream] = torch.from_numpy(bigger)
        return pt

    # ------------------------------------------------------------------------------------------
    def pages_free(self, stream: str) -> int:
        """Free pages of ``stream``."""
        return len(self._free[stream])

    def pages_used(self, stream: str) -> int:
        """Pages of ``stream`` owned by some request."""
        return self.num_pages[stream] - 1 - len(self._free[stream])

    def bytes_used(self, stream: str) -> int:
        """Bytes of ``stream`` held by requests, across every layer that has it (whole pages)."""
        spec = self.streams[stream]
        element = self._buffers[(spec.layers[0], stream)].element_size()
        return self.pages_used(stream) * self.page_size * spec.bytes_per_row(element)

    def bytes_reserved(self) -> int:
        """Bytes of every buffer the pool allocated (its memory footprint)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def owners(self, stream: str) -> dict[int, list[int]]:
        """Live pages of every holder in ``stream`` (a shared page is listed under each of its holders)."""
        return {rid: [p for p in t if p != _FREED] for rid, t in self._tables[stream].items()}

    def holders(self, stream: str, page: int) -> int:
        """How many page tables of ``stream`` hold ``page`` (0: the page is free)."""
        return int(self._refs[stream][page])

    def pages_only_held_by(self, stream: str, rids: Collection[int]) -> int:
        """Pages of ``stream`` that no holder outside ``rids`` holds (what releasing them all would free)."""
        mine: set[int] = set()
        others: set[int] = set()
        for rid, table in self._tables[stream].items():
            (mine if rid in rids else others).update(p for p in table if p != _FREED)
        return len(mine - others)

    def bytes_only_held_by(self, rids: Collection[int]) -> int:
        """Bytes of the pages (every stream, every layer) that no holder outside ``rids`` holds: what
        releasing all of ``rids`` would free (a prefix cache's own footprint)."""
        keep = set(rids)
        total = 0
        for name, spec in self.streams.items():
            element = self._buffers[(spec.layers[0], name)].element_size()
            total += self.pages_only_held_by(name, keep) * self.page_size * spec.bytes_per_row(element)
        return total
