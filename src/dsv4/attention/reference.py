"""The reference AttentionBackend: pure PyTorch, vectorised over a ragged batch, the oracle for others.

One plan per step turns the batch (and, when paged, the pool's page tables) into gather indices:

- window: for each new token the W raw-kv rows ``t-W+1 … t`` of its request;
- per compression ratio m: the slots of every block that closes in this step (emission), and for
  each new token the compressed entries ``i < (t+1)//m`` it may see.

A layer then writes its new rows, gathers what each token reads and does the math of
:mod:`dsv4.attention.ops`. Without a pool (training, full forward) the "storage" of every stream is
just the tensor computed in this forward, so autograd sees everything; a request whose prefix is
another request of the batch (``ForwardBatch.parents``) reads its parent's rows there. With a pool,
rows are written into the pool first (streams are append-only, nothing a step reads is overwritten)
and read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from dsv4.attention import ops
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import (
    AttentionInputs,
    AttentionLayer,
    CompressorInputs,
    CompressorParams,
    KernelSet,
    KVPool,
)
from dsv4.core.kv import StreamSpec

__all__ = ["ReferenceAttentionBackend", "ReferencePlan", "kv_streams"]


def kv_streams(config: ModelConfig) -> list[StreamSpec]:
    """The streams DeepSeek-V4 attention keeps per request (spec §9: window, compressed, indexer, state)."""
    n_main = config.num_hidden_layers
    all_layers = tuple(range(n_main + config.num_nextn_predict_layers))
    d = config.head_dim
    streams = [StreamSpec("win", d, all_layers, keep=config.sliding_window - 1)]
    for ratio in sorted(set(config.compress_ratios) - {0}):
        layers = tuple(i for i in range(n_main) if config.compress_ratio(i) == ratio)
        csa = config.layer_types[layers[0]] == "compressed_sparse_attention"
        coff = 2 if csa else 1
        # Compressor rows [K | Z] of the open block (and, overlapping, of the previous block).
        streams.append(StreamSpec(f"c{ratio}.rows", 2 * coff * d, layers, keep=(coff - 1) * ratio, align=ratio))
        streams.append(StreamSpec(f"c{ratio}.ent", d, layers, ratio=ratio))
        if csa:
            ci = config.index_head_dim
            streams.append(StreamSpec(f"c{ratio}.irows", 4 * ci, layers, keep=ratio, align=ratio))
            streams.append(StreamSpec(f"c{ratio}.ient", ci, layers, ratio=ratio))
    return streams


@dataclass(slots=True)
class _RatioPlan:
    ratio: int
    emit_req: torch.Tensor  # [E] request of each block closing in this step
    emit_block: torch.Tensor  # [E] its block number i
    emit_rows: torch.Tensor  # [E, coff*m] logical row (token position) of each slot
    emit_valid: torch.Tensor  # [E, coff*m]
    visible: torch.Tensor  # [Tg, N] logical entry index read by each gather-path token
    visible_valid: torch.Tensor  # [Tg, N]: the first visible_count[t] of a row
    visible_count: torch.Tensor  # [Tg]
    derived: dict[Any, torch.Tensor] = field(default_factory=dict)  # per-step values a backend reuses across layers


@dataclass(slots=True)
class _DenseRequest:
    """A request whose new tokens attend as one dense block (long prefill chunks, training)."""

    index: int  # request index in the batch
    start: int  # first row of its new tokens in the batch
    length: int  # its new tokens
    positions: torch.Tensor  # [e] absolute positions of the new tokens
    context: torch.Tensor  # [L] positions of the window rows the chunk reads (prefix tail + itself)
    # The same on the host, so layers slice without reading the device: positions[0], context[0].
    first: int
    context_start: int


@dataclass(slots=True)
class _Local:
    """One stream's in-forward storage (no pool): request ``r``'s own rows start at ``base[r]`` and hold
    its logical rows from ``first[r]`` on; the logical rows before ``first[r]`` (its prefix) are its
    parent's, found the same way (a parent may have a parent: ``depth`` links at most). ``first is
    None``: no request has a parent."""

    base: torch.Tensor  # [R]
    first: torch.Tensor | None = None  # [R]
    parent: torch.Tensor | None = None  # [R], a root its own
    depth: int = 0

    def rows(self, req: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        if self.first is None or self.parent is None:
            return self.base[req] + logical
        owner = req
        for _ in range(self.depth):  # up the chain until the request whose own rows hold `logical`
            owner = torch.where(logical < self.first[owner], self.parent[owner], owner)
        return self.base[owner] + logical - self.first[owner]


def _local(base: torch.Tensor, first: list[int], parents: tuple[int, ...] | None) -> _Local:
    if parents is None:
        return _Local(base)
    links = [r if q < 0 else q for r, q in enumerate(parents)]
    depth = 0
    for r in range(len(links)):  # parents come earlier in the batch: the chains end
        d, q = 0, r
        while links[q] != q:
            d, q = d + 1, links[q]
        depth = max(depth, d)
    dev = base.device
    return _Local(base, torch.tensor(first, dtype=torch.long, device=dev), torch.tensor(links, device=dev), depth)


@dataclass(slots=True)
class ReferencePlan:
    """Per-step metadata of :class:`ReferenceAttentionBackend` (built once, read by every layer)."""

    batch: ForwardBatch
    pool: KVPool | None
    kernels: KernelSet  # the step's kernel set; its mode decides the arithmetic paths below
    gather_tokens: torch.Tensor | None  # rows attending by per-token gathers (None: every row)
    window: torch.Tensor  # [Tg, W] logical rows (positions) each gather-path token reads
    window_valid: torch.Tensor  # [Tg, W]
    ratios: dict[int, _RatioPlan]
    dense: list[_DenseRequest]
    # Rows of the concatenated outputs [gather rows, dense request 0 rows, ...] in batch order.
    inverse: torch.Tensor | None
    # No pool: where each request's rows of every stream sit in the forward's own tensors.
    local: dict[str, _Local] = field(default_factory=dict)
    _slots: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def slots(self, stream: str, purpose: str, req: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Storage rows of ``(req, logical)`` in ``stream``, resolved once per step and purpose."""
        key = (stream, purpose)
        if key not in self._slots:
            if self.pool is None:
                self._slots[key] = self.local[stream].rows(req, logical)
            else:
                assert self.batch.rids is not None
                self._slots[key] = self.pool.slots(stream, self.batch.rids, req, logical)
        return self._slots[key]


class ReferenceAttentionBackend:
    """Pure-PyTorch DeepSeek-V4 attention for training and paged inference."""

    name: ClassVar[str] = "reference"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"training", "paged", "fake_quant", "indexer_loss", "routing_replay", "batch_invariant", "shared_prefix",
         "cpu", "cuda"}
    )

    def __init__(
        self, config: ModelConfig, device: torch.device | str = "cpu", *, dense_min_tokens: int = 32
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        # A request with at least this many new tokens attends as one dense block (q against its
        # contiguous context) instead of per-token gathers of W rows each.
        self.dense_min_tokens = dense_min_tokens
        self.dense_block = 256  # queries per block of the dense path

    @classmethod
    def refuse(cls, config: ModelConfig, device: torch.device) -> str | None:
        """Serves every configuration on every device torch supports."""
        return None

    def kv_streams(self) -> list[StreamSpec]:
        """What this backend stores in a KV pool."""
        return kv_streams(self.config)

    # ------------------------------------------------------------------------------------------
    def plan(self, batch: ForwardBatch, pool: KVPool | None, kernels: KernelSet) -> ReferencePlan:
        """Gather indices for the step; ``pool=None``: every request is a whole sequence, or its prefix
        is another request of the batch (``batch.parents``). In a batch-invariant step every token
        gathers (no dense blocks), with widths fixed for ``kernels.max_context`` tokens, so no shape
        depends on the batch."""
        parents = batch.parents
        orphans = [r for r, p in enumerate(batch.prefix_lens_host) if p and (parents is None or parents[r] < 0)]
        if pool is None and orphans:
            raise ValueError("a batch with cached prefixes (prefix_lens > 0) needs a KV pool, or parents in the batch")
        if pool is not None and batch.rids is None:
            raise ValueError("a paged batch needs request ids (ForwardBatch.rids)")
        cfg, dev = self.config, batch.positions.device
        w = cfg.sliding_window
        seq_lens = batch.seq_lens_host
        starts = [sum(batch.extend_lens_host[:r]) for r in range(batch.num_requests)]
        dense: list[_DenseRequest] = []
        invariant_context = _invariant_context(kernels)
        if invariant_context is not None and max(seq_lens) > invariant_context:
            raise ValueError(
                f"a sequence of {max(seq_lens)} tokens exceeds the batch-invariant context {invariant_context}"
            )
        for r, (e, p) in enumerate(zip(batch.extend_lens_host, batch.prefix_lens_host, strict=True)):
            if e >= self.dense_min_tokens and invariant_context is None:
                c0 = max(0, p - w + 1)
                positions = torch.arange(p, p + e, device=dev)
                dense.append(_DenseRequest(r, starts[r], e, positions, torch.arange(c0, p + e, device=dev), p, c0))
        gather_tokens: torch.Tensor | None = None
        inverse: torch.Tensor | None = None
        if dense:
            in_dense = torch.zeros(batch.num_tokens, dtype=torch.bool, device=dev)
            for d in dense:
                in_dense[d.start : d.start + d.length] = True
            gather_tokens = (~in_dense).nonzero().squeeze(1)
            order = torch.cat([gather_tokens] + [torch.arange(d.start, d.start + d.length, device=dev) for d in dense])
            if not torch.equal(order, torch.arange(batch.num_tokens, device=dev)):
                inverse = torch.argsort(order)
        pos = batch.positions if gather_tokens is None else batch.positions[gather_tokens]
        window = pos.unsqueeze(1) - (w - 1) + torch.arange(w, device=dev)  # [Tg, W]
        window_valid = window >= 0
        plan = ReferencePlan(batch, pool, kernels, gather_tokens, window.clamp(min=0), window_valid, {}, dense, inverse)
        if pool is None:
            plan.local["win"] = _local(batch.starts, list(batch.prefix_lens_host), parents)
        for ratio in sorted(set(cfg.compress_ratios) - {0}):
            overlap = ratio == cfg.compress_ratio_csa and "compressed_sparse_attention" in cfg.layer_types
            coff = 2 if overlap else 1
            first = [p // ratio for p in batch.prefix_lens_host]
            count = [n // ratio - f for n, f in zip(seq_lens, first, strict=True)]
            counts = torch.tensor(count, dtype=torch.long, device=dev)
            emit_req = torch.repeat_interleave(torch.arange(len(count), device=dev), counts, output_size=sum(count))
            offsets = torch.cumsum(counts, 0) - counts
            emit_block = torch.tensor(first, dtype=torch.long, device=dev)[emit_req]
            emit_block = emit_block + torch.arange(emit_req.shape[0], device=dev) - offsets[emit_req]
            emit_rows = (emit_block.unsqueeze(1) - (coff - 1)) * ratio + torch.arange(coff * ratio, device=dev)
            emit_valid = emit_rows >= 0
            n_visible = (pos + 1) // ratio  # [Tg]
            longest = invariant_context or max(seq_lens)
            width = longest // ratio if pos.shape[0] else 0
            visible = torch.arange(width, device=dev).expand(pos.shape[0], width)
            visible_valid = visible < n_visible.unsqueeze(1)
            visible = torch.where(visible_valid, visible, 0)  # unseen entries read entry 0, masked
            plan.ratios[ratio] = _RatioPlan(
                ratio, emit_req, emit_block, emit_rows.clamp(min=0), emit_valid,
                visible.contiguous(), visible_valid, n_visible.clamp(max=width),
            )
            if pool is None:
                # Token streams hold the forward's own rows; entry streams its emitted blocks in order.
                for name in ("rows", "irows"):
                    plan.local[f"c{ratio}.{name}"] = plan.local["win"]
                for name in ("ent", "ient"):
                    plan.local[f"c{ratio}.{name}"] = _local(offsets, first, parents)
        return plan

    # ------------------------------------------------------------------------------------------
    def forward(self, layer: AttentionLayer, inputs: AttentionInputs, metadata: Any) -> torch.Tensor:
        """Window + compressed (+ indexer top-k) attention with sinks for the step's new tokens."""
        plan: ReferencePlan = metadata
        batch, lid, ratio = plan.batch, layer.layer_id, layer.ratio
        win = self._store(plan, lid, "win", plan.slots("win", "write", batch.req_index, batch.positions), inputs.kv)
        entries = keys = None
        if ratio:
            assert inputs.compressor is not None and layer.compressor is not None
            rp = plan.ratios[ratio]
            entries = self._compress(plan, rp, lid, f"c{ratio}", "rows", "ent", inputs.compressor, layer.compressor)
            if inputs.indexer is not None and layer.indexer is not None:
                keys = self._compress(
                    plan, rp, lid, f"c{ratio}", "irows", "ient", inputs.indexer.keys, layer.indexer.compressor
                )
        routing = inputs.routing
        picks = None
        if keys is not None and routing is not None:
            if routing.replay:
                picks = routing.indexer.get(lid)
            else:  # filled by the attend paths: each row's entry ids, -1 where none
                picks = torch.full((batch.num_tokens, layer.index_topk), -1, dtype=torch.long, device=win.device)
                routing.indexer[lid] = picks
        pieces = []
        if plan.gather_tokens is None or plan.gather_tokens.numel():
            pieces.append(self._attend_gathered(plan, layer, inputs, win, entries, keys, picks))
        for d in plan.dense:
            pieces.append(self._attend_dense(plan, d, layer, inputs, win, entries, keys, picks))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out if plan.inverse is None else out[plan.inverse]

    def _attend_gathered(
        self,
        plan: ReferencePlan,
        layer: AttentionLayer,
        inputs: AttentionInputs,
        win: torch.Tensor,
        entries: torch.Tensor | None,
        keys: torch.Tensor | None,
        picks: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode-shaped tokens: each gathers its own W window rows and visible entries."""
        sel = plan.gather_tokens
        req = plan.batch.req_index if sel is None else plan.batch.req_index[sel]
        q = inputs.q if sel is None else inputs.q[sel]
        t, w = plan.window.shape
        # What each token reads: (storage, storage rows [Tg, J]) per part, with validity [Tg, J].
        sources = [(win, plan.slots("win", "read", req.unsqueeze(1), plan.window))]
        masks = [plan.window_valid]
        kl_args = None
        if entries is not None:
            rp = plan.ratios[layer.ratio]
            visible = plan.slots(f"c{layer.ratio}.ent", "read", req.unsqueeze(1), rp.visible)
            if keys is not None:
                assert inputs.indexer is not None
                ivisible = plan.slots(f"c{layer.ratio}.ient", "read", req.unsqueeze(1), rp.visible)
                iq, iw = inputs.indexer.q, inputs.indexer.weights
                if sel is not None:
                    iq, iw = iq[sel], iw[sel]
                replay = None
                if picks is not None and inputs.routing is not None and inputs.routing.replay:
                    replay = picks if sel is None else picks[sel]
                top, top_valid, top_scores = self._indexer_topk(
                    plan, iq, iw, keys, ivisible, rp.visible_count, layer.index_topk, replay, inputs.aux is not None
                )
                _record(inputs, picks, sel, top, top_valid)
                visible = visible.gather(1, top)
                masks.append(top_valid)
                kl_args = (top_scores, top_valid)
            else:
                masks.append(rp.visible_valid)
            sources.append((entries, visible))
        if plan.kernels.mode == "inference" and inputs.aux is None:
            return self._attend_inference(layer, q, sources, masks)
        parts = [_gather_rows(store, rows) for store, rows in sources]
        kv = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        valid = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
        out, probs = ops.sink_attention(q, kv, valid, layer.attn_sink, layer.softmax_scale)
        if inputs.aux is not None and kl_args is not None:
            inputs.aux.setdefault("indexer_kl", []).append(ops.indexer_kl(probs[..., w:], *kl_args))
        return out

    def _indexer_topk(
        self,
        plan: ReferencePlan,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: torch.Tensor,
        rows: torch.Tensor,
        limit: torch.Tensor,
        topk: int,
        replay: torch.Tensor | None,
        training_objective: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The indexer's picks ``[T, k]`` (positions in the N axis of ``rows``), their visibility and
        scores (:func:`ops.select_topk`) for queries ``q``: token t scores the keys ``keys[rows[t, s]]``
        (``rows [T, N]``; ``[N]``: keys shared by every query, a prefill chunk) for ``s < limit[t]``.
        ``training_objective``: the indexer's loss is being computed, so its scores need their graph.

        Here: per-token rows gather their keys (:func:`ops.indexer_topk`, the oracle); shared ones are
        streamed in blocks (:func:`ops.indexer_topk_shared`). Backends with kernels that read the
        storage in place override this."""
        if rows.dim() == 2:
            valid = torch.arange(rows.shape[1], device=rows.device) < limit.unsqueeze(1)
            return ops.indexer_topk(q, weights, _gather_rows(keys, rows), valid, topk, replay)
        top, valid, scores = ops.indexer_topk_shared(q, weights, keys, rows, limit, topk, replay)
        if training_objective or replay is not None:  # the picks' own scores, with their graph
            scores = ops.indexer_scores_at(q, weights, keys, rows, top, valid)
        return top, valid, scores

    def _attend_inference(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        sources: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor],
    ) -> torch.Tensor:
        """Inference (no autograd, not batch-invariant, no auxiliary loss) of the gather path: token t
        attends over ``store[rows[t, j]]`` where ``masks[t, j]``, for each ``(store, rows)`` source.

        Here: gather, then attend over the window and the entries without concatenating them. (Training
        keeps one product over both, the arithmetic its checkpoints were made with.) Backends with
        kernels that read the storage in place override this.
        """
        parts = [_gather_rows(store, rows) for store, rows in sources]
        return ops.sink_attention_parts(q, parts, masks, layer.attn_sink, layer.softmax_scale)

    def _attend_dense(
        self,
        plan: ReferencePlan,
        d: _DenseRequest,
        layer: AttentionLayer,
        inputs: AttentionInputs,
        win: torch.Tensor,
        entries: torch.Tensor | None,
        keys: torch.Tensor | None,
        picks: torch.Tensor | None,
    ) -> torch.Tensor:
        """A long chunk of one request: its queries against its contiguous window context and entries, in
        blocks of ``dense_block`` queries. A ratio-4 layer reads only each query's top-k entries
        (:meth:`_attend_dense_sparse`), the others every visible one (:meth:`_attend_dense_band`)."""
        req = torch.full_like(d.context, d.index)
        ctx_slots = plan.slots("win", f"ctx{d.index}", req, d.context)  # [L]
        ent_slots = None
        if entries is not None:
            n = (d.first + d.length) // layer.ratio  # positions[-1] + 1
            ent_slots = plan.slots(f"c{layer.ratio}.ent", f"ctx{d.index}", req[:1].expand(n),
                                   torch.arange(n, device=ctx_slots.device))
            if keys is not None and n:
                return self._attend_dense_sparse(plan, d, layer, inputs, win, entries, keys, picks, ctx_slots,
                                                 ent_slots)
        return self._attend_dense_band(plan, d, layer, inputs, win, entries, ctx_slots, ent_slots)

    def _window_rows(
        self, d: _DenseRequest, b0: int, b1: int, ctx_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage rows ``[b, W]`` of the window of queries ``b0 … b1 - 1`` of a dense request, and their
        validity (the gather path's per-token view of the window; ``ctx_slots [L]`` are the context's rows)."""
        w = self.config.sliding_window
        t = d.positions[b0:b1].unsqueeze(1)  # [b, 1]
        j = t - d.context_start - (w - 1) + torch.arange(w, device=t.device)  # [b, W] rows in the context
        return ctx_slots[j.clamp(min=0)], j >= 0

    def _attend_dense_band(
        self,
        plan: ReferencePlan,
        d: _DenseRequest,
        layer: AttentionLayer,
        inputs: AttentionInputs,
        win: torch.Tensor,
        entries: torch.Tensor | None,
        ctx_slots: torch.Tensor,
        ent_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`_attend_dense` of a layer that attends every visible entry (or none): per block of
        queries, one product over the shared window band (and entries) with masks, so memory stays
        O(block · (block + W + N)). ``ctx_slots [L]``/``ent_slots [N]``: storage rows of the context and
        the entries. Backends with kernels that read the storage in place override this."""
        w, ratio = self.config.sliding_window, layer.ratio
        kv = win.index_select(0, ctx_slots)  # [L, d]
        ent = None if entries is None or ent_slots is None else entries.index_select(0, ent_slots)  # [N, d]
        c0 = d.context_start
        outs = []
        for b0 in range(0, d.length, self.dense_block):
            b1 = min(d.length, b0 + self.dense_block)
            t = d.positions[b0:b1].unsqueeze(1)  # [b, 1]
            lo = max(0, d.first + b0 - w + 1 - c0)  # positions[b0] - w + 1, in the context
            hi = d.first + b1 - c0  # positions[b1 - 1] + 1
            ctx = d.context[lo:hi].unsqueeze(0)
            kvs, masks = [kv[lo:hi]], [(ctx <= t) & (ctx > t - w)]  # the sliding-window band
            if ent is not None:
                kvs.append(ent)
                masks.append(torch.arange(ent.shape[0], device=kv.device).unsqueeze(0) < (t + 1) // ratio)  # [b, N]
            out, _ = ops.dense_sink_attention(
                inputs.q[d.start + b0 : d.start + b1], kvs, masks, layer.attn_sink, layer.softmax_scale
            )
            outs.append(out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _attend_dense_sparse(
        self,
        plan: ReferencePlan,
        d: _DenseRequest,
        layer: AttentionLayer,
        inputs: AttentionInputs,
        win: torch.Tensor,
        entries: torch.Tensor,
        keys: torch.Tensor,
        picks: torch.Tensor | None,
        ctx_slots: torch.Tensor,
        ent_slots: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`_attend_dense` of a ratio-4 layer: the indexer's top-k over the request's keys, then each
        block of queries attends over its window and its picks only (O(block · (W + k)) per block).
        ``ctx_slots [L]``/``ent_slots [N]`` are the storage rows of the window context and the entries."""
        w, ratio, dev = self.config.sliding_window, layer.ratio, ctx_slots.device
        assert inputs.indexer is not None
        n = ent_slots.shape[0]
        batch_rows = torch.arange(d.start, d.start + d.length, device=dev)
        req = torch.full((n,), d.index, dtype=torch.long, device=dev)
        key_slots = plan.slots(f"c{ratio}.ient", f"ctx{d.index}", req, torch.arange(n, device=dev))
        replay = None
        if picks is not None and inputs.routing is not None and inputs.routing.replay:
            replay = picks[batch_rows]
        span = slice(d.start, d.start + d.length)
        top, top_valid, top_scores = self._indexer_topk(
            plan, inputs.indexer.q[span], inputs.indexer.weights[span], keys, key_slots, (d.positions + 1) // ratio,
            layer.index_topk, replay, inputs.aux is not None,
        )
        _record(inputs, picks, batch_rows, top, top_valid)
        picked = ent_slots[top]  # [e, k] storage rows of each query's entries
        inference = plan.kernels.mode == "inference" and inputs.aux is None
        c0 = d.context_start
        kv = None if inference else win.index_select(0, ctx_slots)  # [L, d]
        outs, comp_probs = [], []
        for b0 in range(0, d.length, self.dense_block):
            b1 = min(d.length, b0 + self.dense_block)
            t = d.positions[b0:b1].unsqueeze(1)  # [b, 1]
            q = inputs.q[d.start + b0 : d.start + b1]
            if kv is None:  # the gather path's arithmetic: per-token window rows and picks
                rows, valid = self._window_rows(d, b0, b1, ctx_slots)
                sources = [(win, rows), (entries, picked[b0:b1])]
                outs.append(self._attend_inference(layer, q, sources, [valid, top_valid[b0:b1]]))
                continue
            lo = max(0, d.first + b0 - w + 1 - c0)  # positions[b0] - w + 1, in the context
            hi = d.first + b1 - c0  # positions[b1 - 1] + 1
            ctx = d.context[lo:hi].unsqueeze(0)
            out, probs = ops.dense_sink_attention(
                q, [kv[lo:hi], _gather_rows(entries, picked[b0:b1])], [(ctx <= t) & (ctx > t - w), top_valid[b0:b1]],
                layer.attn_sink, layer.softmax_scale,
            )
            outs.append(out)
            comp_probs.append(probs[1])  # [b, H, k], in pick order
        if inputs.aux is not None:
            kl = ops.indexer_kl(torch.cat(comp_probs), top_scores.masked_fill(~top_valid, 0.0), top_valid)
            inputs.aux.setdefault("indexer_kl", []).append(kl)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _compress(
        self,
        plan: ReferencePlan,
        rp: _RatioPlan,
        lid: int,
        prefix: str,
        rows_name: str,
        ent_name: str,
        proj: CompressorInputs,
        compressor: CompressorParams,
    ) -> torch.Tensor:
        """Store new compressor rows, emit the blocks that close, store and return entry storage."""
        batch = plan.batch
        rows_stream, ent_stream = f"{prefix}.{rows_name}", f"{prefix}.{ent_name}"
        new_rows = torch.cat((proj.kv, proj.score), dim=-1)
        rows = self._store(
            plan, lid, rows_stream, plan.slots(rows_stream, "write", batch.req_index, batch.positions), new_rows
        )
        slots = plan.slots(rows_stream, "emit", rp.emit_req.unsqueeze(1), rp.emit_rows)
        entries = self._compress_entries(plan, rows, slots, rp, compressor)
        ent_slots = plan.slots(ent_stream, "write", rp.emit_req, rp.emit_block)
        return self._store(plan, lid, ent_stream, ent_slots, entries)

    @staticmethod
    def _entry_rope(plan: ReferencePlan, rp: _RatioPlan, compressor: CompressorParams) -> torch.Tensor:
        """The rope rotations of the entries emitted this step (at their block's first position), made once
        per step and ratio: keyed by the frequencies' values, so every compressor of the ratio (each owns a
        copy of the same table) shares them. For backends whose kernels rotate entries themselves."""
        key = ("cis", tuple(compressor.inv_freq.tolist()))
        cis = rp.derived.get(key)
        if cis is None:
            cis = rp.derived[key] = plan.kernels.rope_cis(rp.emit_block * rp.ratio, compressor.inv_freq)
        return cis

    def _compress_entries(
        self, plan: ReferencePlan, rows: torch.Tensor, slots: torch.Tensor, rp: _RatioPlan, compressor: CompressorParams
    ) -> torch.Tensor:
        """The entries ``[E, c]`` of the blocks closing in this step, from the compressor rows stored at
        ``rows[slots]`` (backends with kernels that read the storage in place override this)."""
        return ops.compress_entries(
            rows[slots],
            rp.emit_valid,
            ape=compressor.ape,
            norm_weight=compressor.norm.weight,
            eps=compressor.norm.eps,
            positions=rp.emit_block * rp.ratio,
            inv_freq=compressor.inv_freq,
            overlap=compressor.overlap,
            finish=compressor.finish,
            kernels=plan.kernels,
        )

    @staticmethod
    def _store(plan: ReferencePlan, lid: int, stream: str, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write ``rows`` at ``slots`` and return the storage to gather from."""
        if plan.pool is None:
            return rows  # in-forward storage: row order is the slot order by construction
        buf = plan.pool.buffer(lid, stream)
        buf[slots] = rows.to(buf.dtype)
        return buf



def _invariant_context(kernels: KernelSet) -> int | None:
    """The longest sequence of a batch-invariant step (``None``: not batch-invariant)."""
    if kernels.mode != "batch_invariant":
        return None
    if kernels.max_context is None:
        raise ValueError(f"batch-invariant kernel set {kernels.name!r} has no max_context (the longest sequence)")
    return kernels.max_context


def _record(
    inputs: AttentionInputs, picks: torch.Tensor | None, rows: torch.Tensor | None, top: torch.Tensor, valid: torch.Tensor
) -> None:
    """Write this path's indexer picks (entry ids, -1 where none) into the step's routing record."""
    if picks is None or inputs.routing is None or inputs.routing.replay:
        return
    ids = torch.where(valid, top, -1)
    if rows is None:
        picks[:, : ids.shape[1]] = ids
    else:
        picks[rows, : ids.shape[1]] = ids


def _gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` as ``[*index.shape, width]``; zeros when there is nothing to gather yet."""
    if source.shape[0] == 0:  # no entry emitted anywhere in the batch: every pick is masked anyway
        return source.new_zeros(*index.shape, source.shape[-1])
    # Masked picks may point one past a request's last entry (e.g. the batch's last request has none
    # yet): keep them in range; their weight is zero.
    flat = index.reshape(-1).clamp(max=source.shape[0] - 1)
    return source.index_select(0, flat).view(*index.shape, source.shape[-1])
