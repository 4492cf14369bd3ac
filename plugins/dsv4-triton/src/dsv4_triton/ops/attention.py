# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""DeepSeek-V4 attention kernels that read the KV pool in place, by slot.

- :func:`sink_attention`: each token attends over its own rows of one or two stores (window rows,
  then its selected compressed entries), 16 of its heads per program (one KV head shared by all),
  with an online softmax whose running maximum starts at the head's sink;
- :func:`compress_entries`: gated softmax pooling of a closing block's stored compressor rows (the
  ratio-4 overlap of two half-series included; online over chunks of slots, so ratio-128 blocks fit), then
  RMSNorm and rope, one entry per program;
- :func:`index_scores`: the lightning indexer's scores of each token's visible keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["compress_entries", "index_scores", "sink_attention"]

_BLOCK_H = 16  # heads per attention program (tl.dot's minimum; a 512-wide head's accumulator stays small)


@triton.jit
def _attend_part(
    q, t, store_ptr, rows_ptr, valid_ptr, J, stride_s, d, m, l, acc,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fold token ``t``'s rows ``store[rows[t, j]]`` (where ``valid[t, j]``) into the online softmax
    ``(m, l, acc)`` of its scaled queries ``q [BH, BD]``."""
    c = tl.arange(0, BLOCK_D)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ok = tl.load(valid_ptr + t * J + j, mask=j < J, other=0) != 0
        slot = tl.load(rows_ptr + t * J + j, mask=ok, other=0)  # masked picks may point anywhere
        kv = tl.load(store_ptr + slot[:, None] * stride_s + c[None, :], mask=ok[:, None] & (c[None, :] < d),
                     other=0.0).to(tl.float32)  # [BJ, BD]
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(kv), input_precision="ieee"), float("-inf"))  # [BH, BJ]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
        m = m_new
    return m, l, acc


@triton.jit
def _sink_attention_kernel(
    q_ptr, sink_ptr, out_ptr, store1_ptr, rows1_ptr, valid1_ptr, J1, stride_s1,
    store2_ptr, rows2_ptr, valid2_ptr, J2, stride_s2, H, d, stride_qt, stride_qh, stride_ot, stride_oh, scale,
    TWO_PARTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``o[t, h] = Σ_j e^{s_j} kv_j / (Σ_j e^{s_j} + e^{sink_h})`` over token t's valid rows of both parts."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_D)
    hmask = h < H
    qmask = hmask[:, None] & (c[None, :] < d)
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + c[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * scale  # [BH, BD]
    m = tl.load(sink_ptr + h, mask=hmask, other=0.0).to(tl.float32)  # the sink: e^{sink - m} = 1 to start
    l = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    m, l, acc = _attend_part(q, t, store1_ptr, rows1_ptr, valid1_ptr, J1, stride_s1, d, m, l, acc, BLOCK_J, BLOCK_D)
    if TWO_PARTS:
        m, l, acc = _attend_part(q, t, store2_ptr, rows2_ptr, valid2_ptr, J2, stride_s2, d, m, l, acc,
                                 BLOCK_J, BLOCK_D)
    out = out_ptr + t * stride_ot + h[:, None] * stride_oh + c[None, :]
    tl.store(out, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)


def sink_attention(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], sink: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Sink attention of ``q [T, H, d]`` over, per token, the rows ``store[rows[t, j]]`` where
    ``valid[t, j]`` of each part ``(store [S, d], rows [T, J], valid [T, J])`` (one or two parts)."""
    t, heads, d = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    flat = []
    for store, rows, valid in parts:
        store = store if store.stride(-1) == 1 else store.contiguous()
        flat.append((store, rows.contiguous(), valid.contiguous(), rows.shape[1], store.stride(0)))
    second = flat[1] if len(flat) == 2 else flat[0]
    bd = block(d, 16, 1 << 16)
    _sink_attention_kernel[(t, triton.cdiv(heads, _BLOCK_H))](
        q, sink.float().contiguous(), out, *flat[0], *second, heads, d, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), scale, TWO_PARTS=len(flat) == 2, BLOCK_H=_BLOCK_H, BLOCK_J=block(8192 // bd, 16, 64),
        BLOCK_D=bd,
    )
    return out


@triton.jit
def _pool_chunk(row, ape, col, width, mask, top, total, acc):
    """Fold a chunk of slots into the per-channel online softmax ``(top, total, acc)`` of the ``kv``
    columns ``col`` weighted by ``score + ape`` (``row [BS, 1]``, ``ape [BS, 1]`` pointers)."""
    score = tl.load(row + width + col, mask=mask, other=0.0).to(tl.float32)
    score += tl.load(ape + col, mask=mask, other=0.0)
    score = tl.where(mask, score, -1e30)  # finite: no inf or NaN even where every slot so far is missing
    new_top = tl.maximum(top, tl.max(score, axis=0))
    p = tl.where(mask, tl.exp(score - new_top[None, :]), 0.0)  # a missing slot weighs exactly 0
    alpha = tl.exp(top - new_top)
    kv = tl.load(row + col, mask=mask, other=0.0).to(tl.float32)
    return new_top, total * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p * kv, axis=0)


@triton.jit
def _compress_kernel(
    rows_ptr, slots_ptr, valid_ptr, ape_ptr, norm_ptr, cs_ptr, out_ptr, C, M, SLOTS, stride_rows, eps, nope, pairs,
    OVERLAP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One entry: softmax over its slots (per channel, online over chunks of ``BLOCK_S`` slots) of
    ``score + ape`` weighting ``kv``, then RMSNorm and rope of the trailing ``pairs`` channel pairs.
    Stored rows are ``[kv | score]``, each ``coff·C`` wide; with ``OVERLAP`` slot s < M (previous block)
    reads the first C channels of each, slot s >= M (own block) the second. Channels go as even/odd
    pairs ``(2i, 2i + 1)``, so the rope pairs are whole channel pairs (``nope`` even)."""
    e = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_P)
    imask = i < C // 2
    width = (2 if OVERLAP else 1) * C  # of the kv part, and of the score part
    top_even = tl.full((BLOCK_P,), -1e30, dtype=tl.float32)
    top_odd = tl.full((BLOCK_P,), -1e30, dtype=tl.float32)
    sum_even = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sum_odd = tl.zeros((BLOCK_P,), dtype=tl.float32)
    even = tl.zeros((BLOCK_P,), dtype=tl.float32)
    odd = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = tl.load(valid_ptr + e * SLOTS + s, mask=s < SLOTS, other=0) != 0
        slot = tl.load(slots_ptr + e * SLOTS + s, mask=ok, other=0)  # missing slots may point anywhere
        col = 2 * i[None, :]  # [1, BP]
        if OVERLAP:
            col = (s // M)[:, None] * C + col  # [BS, BP]
        mask = ok[:, None] & imask[None, :]
        row = rows_ptr + slot[:, None] * stride_rows
        ape = ape_ptr + (s % M)[:, None] * width
        top_even, sum_even, even = _pool_chunk(row, ape, col, width, mask, top_even, sum_even, even)
        top_odd, sum_odd, odd = _pool_chunk(row, ape, col + 1, width, mask, top_odd, sum_odd, odd)
    even = even / tl.where(imask, sum_even, 1.0)  # [BP]; padded channels stay 0
    odd = odd / tl.where(imask, sum_odd, 1.0)
    r = tl.math.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / C + eps)
    even = even * r * tl.load(norm_ptr + 2 * i, mask=imask, other=0.0)
    odd = odd * r * tl.load(norm_ptr + 2 * i + 1, mask=imask, other=0.0)
    pair = i - nope // 2  # the rope pair of channel pair i, when >= 0
    rope = imask & (pair >= 0)
    cos = tl.load(cs_ptr + e * (2 * pairs) + 2 * pair, mask=rope, other=1.0)
    sin = tl.load(cs_ptr + e * (2 * pairs) + 2 * pair + 1, mask=rope, other=0.0)
    out = out_ptr + e * C + 2 * i
    tl.store(out, (even * cos - odd * sin).to(out_ptr.dtype.element_ty), mask=imask)
    tl.store(out + 1, (even * sin + odd * cos).to(out_ptr.dtype.element_ty), mask=imask)


def compress_entries(
    rows: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, *, ape: torch.Tensor, norm_weight: torch.Tensor,
    eps: float, cis: torch.Tensor, overlap: bool,
) -> torch.Tensor:
    """Entries ``[E, c]`` of the blocks whose compressor rows sit at ``rows[slots]`` (``rows [S, 2·coff·c]``,
    ``slots, valid [E, coff·m]``, ``ape [m, coff·c]``), normed and rotated by ``cis [E, rd/2]``
    (``c - rd`` even)."""
    m, width = ape.shape
    c = width // 2 if overlap else width
    out = torch.empty(slots.shape[0], c, dtype=rows.dtype, device=rows.device)
    if out.numel():
        pairs = cis.shape[-1]
        _compress_kernel[(slots.shape[0],)](
            rows, slots.contiguous(), valid.contiguous(), ape.float().contiguous(), norm_weight.float().contiguous(),
            torch.view_as_real(cis.contiguous()), out, c, m, slots.shape[1], rows.stride(0), eps, c - 2 * pairs, pairs,
            OVERLAP=overlap, BLOCK_S=block(slots.shape[1], 1, 16), BLOCK_P=block(c // 2, 1, 1 << 16),
        )
    return out


@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, keys_ptr, rows_ptr, valid_ptr, out_ptr, H, C, N, stride_keys, scale,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``I[t, n] = Σ_h w[t, h] · relu(q[t, h] · keys[rows[t, n]]) · scale`` (``-inf`` where not valid)
    for one token and a block of its visible entries."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    q = tl.load(q_ptr + t * H * C + h[:, None] * C + c[None, :], mask=(h[:, None] < H) & (c[None, :] < C),
                other=0.0).to(tl.float32)  # [BH, BC]
    w = tl.load(w_ptr + t * H + h, mask=h < H, other=0.0).to(tl.float32)
    ok = tl.load(valid_ptr + t * N + n, mask=n < N, other=0) != 0
    slot = tl.load(rows_ptr + t * N + n, mask=ok, other=0)
    keys = tl.load(keys_ptr + slot[:, None] * stride_keys + c[None, :], mask=ok[:, None] & (c[None, :] < C),
                   other=0.0).to(tl.float32)  # [BN, BC]
    s = tl.maximum(tl.dot(q, tl.trans(keys), input_precision="ieee"), 0.0) * scale  # [BH, BN]
    index = tl.sum(s * w[:, None], axis=0)
    tl.store(out_ptr + t * N + n, tl.where(ok, index, float("-inf")), mask=n < N)


def index_scores(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
) -> torch.Tensor:
    """Index scores ``[T, N]`` (fp32, ``-inf`` where not ``valid``) of queries ``q [T, n_I, c]`` with head
    weights ``[T, n_I]`` against the keys ``keys[rows] `` (``keys [S, c]``, ``rows, valid [T, N]``)."""
    t, heads, c = q.shape
    n = rows.shape[1]
    out = torch.empty(t, n, dtype=torch.float32, device=q.device)
    if out.numel():
        keys = keys if keys.stride(-1) == 1 else keys.contiguous()
        bn = block(n, 16, 64)
        _index_scores_kernel[(t, triton.cdiv(n, bn))](
            q.contiguous(), weights.contiguous(), keys, rows.contiguous(), valid.contiguous(), out, heads, c, n,
            keys.stride(0), c**-0.5, BLOCK_H=block(heads, 16, 1 << 16), BLOCK_C=block(c, 16, 1 << 16), BLOCK_N=bn,
        )
    return out
