# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""RMSNorm, interleaved partial RoPE and chosen-token logprobs: row-wise kernels over tiles of rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["rms_norm", "rope", "token_logprobs"]

_TILE = 4096  # elements of one program's tile in the row-wise kernels


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, rows, D, stride_x, stride_out, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out = x · rsqrt(mean(x²) + eps) (· w)`` for a ``[BLOCK_R, D]`` tile of rows (D <= BLOCK_D)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r[:, None] * stride_out + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim of ``x [..., D]`` in fp32, returned in ``x``'s dtype (``weight [D]`` or None)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        bd = block(d, 1, 1 << 16)
        br = block(rows.shape[0], 1, max(1, _TILE // bd))
        _rms_norm_kernel[(triton.cdiv(rows.shape[0], br),)](
            rows, rows if weight is None else weight, out, rows.shape[0], d, rows.stride(0), out.stride(0), eps,
            HAS_WEIGHT=weight is not None, BLOCK_R=br, BLOCK_D=bd,
        )
    return out.view(x.shape)


@triton.jit
def _rope_kernel(
    x_ptr, cs_ptr, out_ptr, rows, heads, nope, pairs, stride_x, stride_out,
    INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Rotate the pairs ``(x[nope + 2i], x[nope + 2i + 1])`` of a tile of rows by their token's
    ``(cos_i, sin_i)`` (``cs [N, pairs, 2]``; row r is token ``r // heads``), copying the first
    ``nope`` channels (``BLOCK_NOPE == 0``: none)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = r < rows
    x_row, out_row = x_ptr + r[:, None] * stride_x, out_ptr + r[:, None] * stride_out
    if BLOCK_NOPE > 0:
        c = tl.arange(0, BLOCK_NOPE)
        mask = rmask[:, None] & (c[None, :] < nope)
        tl.store(out_row + c[None, :], tl.load(x_row + c[None, :], mask=mask), mask=mask)
    p = tl.arange(0, BLOCK_P)
    mask = rmask[:, None] & (p[None, :] < pairs)
    even = tl.load(x_row + nope + 2 * p[None, :], mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_row + nope + 2 * p[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
    cs = cs_ptr + (r // heads)[:, None] * (2 * pairs) + 2 * p[None, :]
    cos = tl.load(cs, mask=mask, other=0.0)
    sin = tl.load(cs + 1, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    dtype = out_ptr.dtype.element_ty
    tl.store(out_row + nope + 2 * p[None, :], (even * cos - odd * sin).to(dtype), mask=mask)
    tl.store(out_row + nope + 2 * p[None, :] + 1, (even * sin + odd * cos).to(dtype), mask=mask)


def rope(x: torch.Tensor, cis: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate the trailing ``2·cis.shape[-1]`` channels of ``x [N, ..., d]`` as interleaved pairs by
    ``cis [N, rd/2]`` (complex64; ``inverse``: the conjugate), into a new tensor of ``x``'s dtype."""
    d, pairs = x.shape[-1], cis.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    cs = torch.view_as_real(cis.contiguous())  # [N, rd/2, 2]: cos, sin
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        nope = d - 2 * pairs
        bp = block(pairs, 1, 1 << 16)
        br = block(rows.shape[0], 1, max(1, _TILE // (bp * 2)))
        _rope_kernel[(triton.cdiv(rows.shape[0], br),)](
            rows, cs, out, rows.shape[0], rows.shape[0] // x.shape[0], nope, pairs, rows.stride(0), out.stride(0),
            INVERSE=inverse, BLOCK_R=br, BLOCK_NOPE=block(nope, 1, 1 << 16) if nope else 0, BLOCK_P=bp,
        )
    return out.view(x.shape)


@triton.jit
def _token_logprobs_kernel(
    logits_ptr, tokens_ptr, out_ptr, rows, V, stride_l, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``logits[r, tokens[r]] - logsumexp(logits[r])`` for a tile of rows, an online max and sum over V."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = r < rows
    row = logits_ptr + r[:, None] * stride_l
    top = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + v[None, :], mask=rmask[:, None] & (v[None, :] < V), other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)  # rows past the end: finite, so no NaN is ever computed
        new_top = tl.maximum(top, tl.max(x, axis=1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[:, None]), axis=1)
        top = new_top
    token = tl.load(tokens_ptr + r, mask=rmask, other=0)
    chosen = tl.load(logits_ptr + r * stride_l + token, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r, chosen - top - tl.log(total), mask=rmask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits [N, V])[i, tokens[i]]`` in fp32 -> ``[N]``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        bv = block(v, 16, 1024)
        br = block(n, 1, max(1, _TILE // bv))
        _token_logprobs_kernel[(triton.cdiv(n, br),)](
            logits, tokens.reshape(-1).contiguous(), out, n, v, logits.stride(0), BLOCK_R=br, BLOCK_V=bv
        )
    return out
