"""A radix prefix cache of window checkpoints: requests that share a start compute it once.

DeepSeek-V4's cache is not a per-token log that any prefix can be cut from. Complete compressed
entries and indexer keys could be shared at any point, but the sliding window cannot be rebuilt from
them: each layer's window rows depend on the previous layer's window further back, so continuing
exactly from a token needs the rows a request holds *there* — the last window's rows and each
compressor's open-block rows, at every layer. A :class:`Checkpoint` is exactly that: a holder in the
KV pool (:meth:`~dsv4.core.interfaces.SharingKVPool.share`) with every row a request of ``depth``
tokens reads, its full pages shared with whoever else holds them (the request it was taken from,
other checkpoints of the same conversation) and only its last partly written page of each stream its
own. A request resumes from the deepest checkpoint inside its longest cached prefix.

The tree is a radix tree over token ids whose nodes may carry a checkpoint. Checkpoints are evicted
least recently used first, when the pool runs short of pages (the pool's ``reclaimer``) or on
:meth:`PrefixCache.flush`. Evicting one releases its pool holder; pages a running request also holds
stay where they are, so eviction never touches a running request's cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dsv4.core.interfaces import SharingKVPool

__all__ = ["Checkpoint", "PrefixCache", "PrefixCacheStats"]


@dataclass(eq=False)
class _Node:
    """``edge``: the tokens from the parent to here; ``depth``: tokens from the root to here."""

    edge: tuple[int, ...]
    depth: int
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None


@dataclass(eq=False)
class Checkpoint:
    """The cache of a request after its first ``depth`` tokens, held in the pool as ``holder``.

    ``payload`` is what the engine keeps beside it (the routing records of those tokens, the model's
    streams at the last one).
    """

    holder: int
    depth: int
    node: _Node
    payload: Any = None


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made (``flush`` keeps them)."""

    lookups: int = 0  # resume attempts
    hits: int = 0  # attempts that resumed from a checkpoint
    hit_tokens: int = 0  # tokens not computed thanks to the cache
    inserted: int = 0  # checkpoints taken
    evictions: int = 0  # checkpoints evicted (pool pressure or flush)


class PrefixCache:
    """Window checkpoints in a radix tree over token ids, held in a :class:`SharingKVPool`.

    ``min_tokens``: shorter prefixes are not worth a checkpoint. Holder ids are negative, so they
    never meet the engine's sequence ids in the pool.
    """

    def __init__(self, pool: SharingKVPool, *, min_tokens: int = 16) -> None:
        self.pool = pool
        self.min_tokens = max(1, min_tokens)
        self.root = _Node((), 0, None)
        self.stats = PrefixCacheStats()
        self._lru: OrderedDict[int, Checkpoint] = OrderedDict()  # holder -> checkpoint, oldest first
        self._holders = itertools.count(-1, -1)
        self._pinned: set[int] = set()

    # ------------------------------------------------------------------------------------------
    @property
    def num_checkpoints(self) -> int:
        """Checkpoints held."""
        return len(self._lru)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, least recently used first."""
        return list(self._lru.values())

    def cached_tokens(self) -> int:
        """Tokens in the tree (each shared prefix counted once)."""
        total, todo = 0, [self.root]
        while todo:
            node = todo.pop()
            total += len(node.edge)
            todo.extend(node.children.values())
        return total

    def pages(self, stream: str) -> int:
        """Pages of ``stream`` that only checkpoints hold."""
        return self.pool.pages_only_held_by(stream, self._lru.keys())

    def bytes(self) -> int:
        """Pool bytes that only checkpoints hold (what flushing the cache would free)."""
        return self.pool.bytes_only_held_by(self._lru.keys())

    # ------------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int | None = None) -> Checkpoint | None:
        """The deepest checkpoint whose tokens are a prefix of ``tokens`` and at most ``limit`` long."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        node, best = self.root, None
        while True:
            if node.checkpoint is not None:  # (never shallower than min_tokens: insert() refuses those)
                best = node.checkpoint
            if node.depth >= limit:
                break
            child = node.children.get(tokens[node.depth])
            if child is None or child.depth > limit or tuple(tokens[node.depth : child.depth]) != child.edge:
                break
            node = child
        return best

    def resume(self, rid: int, tokens: Sequence[int], limit: int) -> Checkpoint | None:
        """Give pool request ``rid`` (holding no pages) the cache of the deepest checkpoint for
        ``tokens`` no longer than ``limit``; the checkpoint used, or ``None`` (nothing cached, or no
        page for the copy)."""
        self.stats.lookups += 1
        ckpt = self.match(tokens, limit)
        if ckpt is None:
            return None
        self._pinned.add(ckpt.holder)  # the copy may make the pool evict: never this one
        try:
            self.pool.share(ckpt.holder, rid, ckpt.depth)
        except MemoryError:
            return None
        finally:
            self._pinned.discard(ckpt.holder)
        self._lru.move_to_end(ckpt.holder)
        self.stats.hits += 1
        self.stats.hit_tokens += ckpt.depth
        return ckpt

    def insert(self, rid: int, tokens: Sequence[int], payload: Any = None) -> Checkpoint | None:
        """Checkpoint pool request ``rid``, which has computed at least ``len(tokens)`` tokens (these)
        and still holds every row a request of that many tokens reads. Already cached: the checkpoint
        is marked used. ``None`` when ``tokens`` is shorter than ``min_tokens`` or no page is free
        even after evicting every other checkpoint."""
        depth = len(tokens)
        if depth < self.min_tokens:
            return None
        found = self.match(tokens, depth)
        if found is not None and found.depth == depth:
            self._lru.move_to_end(found.holder)
            return found
        holder = next(self._holders)
        try:  # before the tree changes: making room may evict (and prune) other checkpoints
            self.pool.share(rid, holder, depth)
        except MemoryError:
            return None
        node = self._node_at(tokens)
        ckpt = node.checkpoint = Checkpoint(holder, depth, node, payload)
        self._lru[holder] = ckpt
        self.stats.inserted += 1
        return ckpt

    def evict_one(self) -> bool:
        """Evict the least recently used checkpoint not in use; False when there is none."""
        victim = next((c for h, c in self._lru.items() if h not in self._pinned), None)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def flush(self) -> int:
        """Evict every checkpoint (after a weight update, or on request); how many there were."""
        n = 0
        while self.evict_one():
            n += 1
        return n

    # ------------------------------------------------------------------------------------------
    def _evict(self, ckpt: Checkpoint) -> None:
        del self._lru[ckpt.holder]
        self.pool.release(ckpt.holder)
        self.stats.evictions += 1
        node = ckpt.node
        node.checkpoint = None
        self._prune(node)

    def _node_at(self, tokens: Sequence[int]) -> _Node:
        """The node at exactly ``tokens``, made (splitting an edge) where the tree has none."""
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tuple(tokens[depth:]), len(tokens), node)
                node.children[tokens[depth]] = leaf
                return leaf
            common = _common(child.edge, tokens, depth)
            if common < len(child.edge):  # split the edge where the tokens leave it
                mid = _Node(child.edge[:common], depth + common, node)
                node.children[tokens[depth]] = mid
                child.edge = child.edge[common:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            node, depth = child, child.depth
        return node

    def _prune(self, node: _Node) -> None:
        """Remove nodes that lead to no checkpoint, and merge a bare node into its only child."""
        while node.parent is not None and node.checkpoint is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
        if node.parent is not None and node.checkpoint is None and len(node.children) == 1:
            (child,) = node.children.values()
            child.edge = node.edge + child.edge
            child.parent = node.parent
            node.parent.children[node.edge[0]] = child


def _common(edge: tuple[int, ...], tokens: Sequence[int], at: int) -> int:
    """How many leading tokens of ``edge`` equal ``tokens[at:]``."""
    n = min(len(edge), len(tokens) - at)
    if tuple(tokens[at : at + n]) == edge[:n]:
        return n
    k = 0
    while edge[k] == tokens[at + k]:
        k += 1
    return k
