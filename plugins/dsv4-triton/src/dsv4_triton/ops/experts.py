# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""Routed experts as a grouped GEMM over token-expert assignments sorted by expert.

Three kernels: the gate/up product of each expert's rows with the clamped SwiGLU in its epilogue
(the tokens' rows gathered in place, by their sorted order), the down product, and the weighted
combine of each token's ``k`` rows in the router's order (no atomics: deterministic). Programs map to
``BLOCK_M``-row tiles of one expert each through the cumulative tile counts, so nothing waits on the
host: the grid is sized for the worst case (every expert one partial tile) and idle programs store
nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["moe_experts"]

_BLOCK_M = 16  # assignment rows per tile (tl.dot's minimum)


@triton.jit
def _expert_tile(tile_ends_ptr, starts_ptr, counts_ptr, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """The expert of program ``program_id(0)``'s tile, its sorted rows ``[BLOCK_M]`` and their validity
    (none past the last tile: its expert is clamped to the last and its rows masked)."""
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_ends_ptr + e, mask=e < E, other=2**30)  # cumulative tiles per expert
    expert = tl.sum((ends <= pid).to(tl.int32), axis=0)
    beyond = expert >= E
    expert = tl.minimum(expert, E - 1)
    first_tile = tl.load(tile_ends_ptr + expert - 1, mask=expert > 0, other=0)
    count = tl.where(beyond, 0, tl.load(counts_ptr + expert))
    rows = (pid - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < count
    return expert.to(tl.int64), (tl.load(starts_ptr + expert) + rows).to(tl.int64), valid


@triton.jit
def _experts_up_kernel(
    x_ptr, order_ptr, up_ptr, act_ptr, tile_ends_ptr, starts_ptr, counts_ptr, E, D, I, TOP_K, stride_x, limit,
    CLAMP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``act[r] = silu(min(x_t·w1ᵀ, L)) · clamp(x_t·w3ᵀ, ±L)`` for the sorted rows r of one expert's tile
    (token ``t = order[r] // TOP_K``; ``up [E, 2I, D]``: w1 over w3), one ``BLOCK_N`` slice of I."""
    expert, rows, valid = _expert_tile(tile_ends_ptr, starts_ptr, counts_ptr, E, BLOCK_E, BLOCK_M)
    token = tl.load(order_ptr + rows, mask=valid, other=0) // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    x = x_ptr + token[:, None] * stride_x + k[None, :]  # [BM, BK]
    w = up_ptr + expert * (2 * I * D) + n[None, :].to(tl.int64) * D + k[:, None]  # [BK, BN] of w1
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        xt = tl.load(x, mask=valid[:, None] & (k[None, :] < D - k0), other=0.0)
        wmask = (k[:, None] < D - k0) & (n[None, :] < I)
        gate = tl.dot(xt, tl.load(w, mask=wmask, other=0.0).to(xt.dtype), gate, input_precision="ieee")
        up = tl.dot(xt, tl.load(w + I * D, mask=wmask, other=0.0).to(xt.dtype), up, input_precision="ieee")
        x += BLOCK_K
        w += BLOCK_K
    if CLAMP:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rows[:, None] * I + n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & (n[None, :] < I))


@triton.jit
def _experts_down_kernel(
    act_ptr, down_ptr, y_ptr, tile_ends_ptr, starts_ptr, counts_ptr, E, D, I,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[r] = act[r] · w2ᵀ`` for the sorted rows r of one expert's tile (``down [E, D, I]``), one
    ``BLOCK_N`` slice of D."""
    expert, rows, valid = _expert_tile(tile_ends_ptr, starts_ptr, counts_ptr, E, BLOCK_E, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    a = act_ptr + rows[:, None] * I + k[None, :]  # [BM, BK]
    w = down_ptr + expert * (D * I) + n[None, :].to(tl.int64) * I + k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        at = tl.load(a, mask=valid[:, None] & (k[None, :] < I - k0), other=0.0)
        wt = tl.load(w, mask=(k[:, None] < I - k0) & (n[None, :] < D), other=0.0)
        acc = tl.dot(at, wt.to(at.dtype), acc, input_precision="ieee")
        a += BLOCK_K
        w += BLOCK_K
    tl.store(y_ptr + rows[:, None] * D + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (n[None, :] < D))


@triton.jit
def _combine_kernel(
    y_ptr, row_of_ptr, weights_ptr, out_ptr, T, D, TOP_K, stride_out, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[t] = Σ_j weights[t, j] · y[row_of[t, j]]`` for a tile of tokens and channels, j in order."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = t < T
    mask = tmask[:, None] & (d[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(TOP_K):
        row = tl.load(row_of_ptr + t * TOP_K + j, mask=tmask, other=0)
        w = tl.load(weights_ptr + t * TOP_K + j, mask=tmask, other=0.0).to(tl.float32)
        acc += w[:, None] * tl.load(y_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None] * stride_out + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor, limit: float,
) -> torch.Tensor:
    """``Σ_k weights[t, k] · expert_{idx[t, k]}(x[t])`` for ``x [T, D]``, ``idx, weights [T, k]``, with the
    experts' weights stacked: ``up [E, 2I, D]`` (w1 over w3) and ``down [E, D, I]``."""
    (t, d), (n_exp, inter) = x.shape, (up.shape[0], down.shape[2])
    top_k = idx.shape[1]
    out = torch.empty_like(x)
    if t == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignment (t, j) = t·k + j of each sorted row
    row_of = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))  # inverse
    counts = torch.zeros(n_exp, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    tile_ends = torch.cumsum((counts + _BLOCK_M - 1) // _BLOCK_M, 0)  # no host sync: the grid is an upper bound
    tiles = triton.cdiv(flat.shape[0], _BLOCK_M) + n_exp
    act = torch.empty(flat.shape[0], inter, dtype=x.dtype, device=x.device)  # [A, I], rows in sorted order
    y = torch.empty(flat.shape[0], d, dtype=x.dtype, device=x.device)  # [A, D]
    be, bk = block(n_exp, 1, 1 << 16), 32
    bi, bd = block(inter, 16, 64), block(d, 16, 64)
    _experts_up_kernel[(tiles, triton.cdiv(inter, bi))](
        x, order, up, act, tile_ends, starts, counts, n_exp, d, inter, top_k, x.stride(0), limit,
        CLAMP=limit > 0, BLOCK_E=be, BLOCK_M=_BLOCK_M, BLOCK_N=bi, BLOCK_K=bk,
    )
    _experts_down_kernel[(tiles, triton.cdiv(d, bd))](
        act, down, y, tile_ends, starts, counts, n_exp, d, inter, BLOCK_E=be, BLOCK_M=_BLOCK_M, BLOCK_N=bd, BLOCK_K=bk,
    )
    bt = block(t, 1, 16)
    _combine_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        y, row_of, weights.contiguous(), out, t, d, top_k, out.stride(0), BLOCK_T=bt, BLOCK_D=bd,
    )
    return out
