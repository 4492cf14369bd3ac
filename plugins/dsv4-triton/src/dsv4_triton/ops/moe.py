# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""The MoE router (scores, top-k, weights) and the clamped SwiGLU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["SCORE_FUNCS", "route", "swiglu"]

#: Router score functions, by their index in the kernel.
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_BLOCK_T = 16  # tokens per router program


@triton.jit
def _log1p(y):
    """``log(1 + y)`` accurate for small ``y`` (Kahan: the rounding of ``1 + y`` divided back out)."""
    u = 1.0 + y
    exact = u == 1.0
    return tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _route_kernel(
    x_ptr, w_ptr, bias_ptr, imposed_ptr, weights_ptr, ids_ptr, T, E, D, stride_x, stride_w, stride_imposed,
    route_scale,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IMPOSED: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Routing of a tile of tokens: ``logits = x @ w^T`` in fp32, scores (``SCORE`` indexes
    :data:`SCORE_FUNCS`), ids = the top-k of ``scores + bias`` (highest first, lowest id on ties)
    unless imposed (rows whose first imposed id is >= 0; every row without a bias), and weights =
    the scores of the ids, renormalised unless softmax-scored, times ``route_scale``."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = t < T
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + t[:, None] * stride_x + d[None, :], mask=tmask[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)  # [BT, BD]
        w = tl.load(w_ptr + e[None, :] * stride_w + d[:, None], mask=(d[:, None] < D) & emask[None, :],
                    other=0.0).to(tl.float32)  # [BD, BE]
        logits = tl.dot(x, w, logits, input_precision="ieee")
    if SCORE == 0:  # sqrt(softplus), softplus as torch's: the identity above 20
        scores = tl.sqrt(tl.where(logits > 20.0, logits, _log1p(tl.exp(tl.minimum(logits, 20.0)))))
    elif SCORE == 1:
        scores = tl.sigmoid(logits)
    else:
        logits = tl.where(emask[None, :], logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < TOP_K
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    if HAS_BIAS:
        select = tl.where(emask[None, :], scores + tl.load(bias_ptr + e, mask=emask, other=0.0)[None, :],
                          float("-inf"))
        for i in tl.static_range(TOP_K):
            best = tl.max(select, axis=1)
            pick = tl.min(tl.where(select == best[:, None], e[None, :], BLOCK_E), axis=1)  # [BT]
            ids = tl.where(kk[None, :] == i, pick.to(tl.int64)[:, None], ids)
            select = tl.where(e[None, :] == pick[:, None], float("-inf"), select)
    if HAS_IMPOSED:
        row = imposed_ptr + t * stride_imposed
        imposed = tl.load(row[:, None] + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0)
        if HAS_BIAS:
            use = tl.load(row, mask=tmask, other=-1) >= 0
            ids = tl.where(use[:, None], imposed, ids)
        else:
            ids = imposed
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(TOP_K):  # each pick's score: a masked sum over the experts
        pick = tl.sum(tl.where(kk[None, :] == i, ids, 0), axis=1)  # [BT]
        score = tl.sum(tl.where(e[None, :] == pick[:, None], scores, 0.0), axis=1)
        weights = tl.where(kk[None, :] == i, score[:, None], weights)
    if SCORE != 2:  # as DeepSeek's reference: renormalise unless softmax-scored
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = t[:, None] * TOP_K + kk[None, :]
    mask = tmask[:, None] & kmask[None, :]
    tl.store(weights_ptr + out, weights * route_scale, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, imposed: torch.Tensor | None,
    *, score_func: str, top_k: int, route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights (fp32) and expert ids (int64) ``[T, k]`` of tokens ``x [T, D]`` for the router
    ``weight [E, D]``; ``imposed [T, k]`` replaces the ids of rows whose first id is >= 0 (all rows when
    ``bias`` is None: hash routing)."""
    if bias is None and imposed is None:
        raise ValueError("a router without a selection bias needs imposed expert ids (hash routing)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    t, e = x.shape[0], weight.shape[0]
    weights = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.long, device=x.device)
    if t:
        imposed_rows = None if imposed is None else imposed.long().contiguous()
        _route_kernel[(triton.cdiv(t, _BLOCK_T),)](
            x, weight, weight if bias is None else bias.float().contiguous(),
            ids if imposed_rows is None else imposed_rows, weights, ids, t, e, x.shape[1], x.stride(0),
            weight.stride(0), 0 if imposed_rows is None else imposed_rows.stride(0), route_scale,
            SCORE=SCORE_FUNCS.index(score_func), HAS_BIAS=bias is not None, HAS_IMPOSED=imposed is not None,
            TOP_K=top_k, BLOCK_T=_BLOCK_T, BLOCK_E=block(e, 16, 1 << 16), BLOCK_D=block(x.shape[1], 16, 64),
            BLOCK_K=block(top_k, 1, 1 << 16),
        )
    return weights, ids


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr, rows, C, stride_gate, stride_up, limit,
    CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``silu(min(gate, L)) · clamp(up, -L, L)`` (no clamping unless ``CLAMP``) on a tile of rows."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < C)
    g = tl.load(gate_ptr + r[:, None] * stride_gate + c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + r[:, None] * stride_up + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(out_ptr + r[:, None] * C + c[None, :], (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU of ``gate, up [..., C]`` (row-strided views allowed) in ``gate``'s dtype."""
    c = gate.shape[-1]
    g, u = gate.reshape(-1, c), up.reshape(-1, c)
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        bc = block(c, 1, 1024)
        br = block(g.shape[0], 1, max(1, 4096 // bc))
        _swiglu_kernel[(triton.cdiv(g.shape[0], br), triton.cdiv(c, bc))](
            g, u, out, g.shape[0], c, g.stride(0), u.stride(0), limit, CLAMP=limit > 0, BLOCK_R=br, BLOCK_C=bc,
        )
    return out.view(gate.shape)
