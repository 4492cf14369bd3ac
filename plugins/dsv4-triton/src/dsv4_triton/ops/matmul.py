# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""Tiled matmul against a weight's rows: the linears and the grouped output projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["grouped_linear", "linear"]


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_az, stride_am, stride_ak, stride_bz, stride_bn, stride_bk, stride_cz, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C[z] = A[z] @ B[z]^T`` for ``A [M, K]``, ``B [N, K]`` (a weight's rows), ``C [M, N]``; one
    ``[BLOCK_M, BLOCK_N]`` tile of one group ``z`` per program, fp32 accumulation."""
    z = tl.program_id(2)
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + z * stride_az + rm[:, None] * stride_am + rk[None, :] * stride_ak  # [BM, BK]
    b = b_ptr + z * stride_bz + rn[None, :] * stride_bn + rk[:, None] * stride_bk  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_tile = tl.load(a, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b_tile = tl.load(b, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        # "ieee": fp32 products stay fp32 (Triton's default for fp32 is TF32, torch's is not)
        acc = tl.dot(a_tile, b_tile.to(a_tile.dtype), acc, input_precision="ieee")
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    c = c_ptr + z * stride_cz + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    """``c[z] = a[z] @ b[z]^T`` for strided views ``a [Z, M, K]``, ``b [Z, N, K]``, ``c [Z, M, N]``."""
    (groups, m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    bm, bn, bk = block(m, 16, 64), block(n, 16, 64), block(k, 16, 32)
    _matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), groups)](
        a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ weight^T`` -> ``[..., N]`` in ``x``'s dtype (``weight [N, K]``)."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # [M, N]
    _launch(rows.unsqueeze(0), weight.unsqueeze(0), out.unsqueeze(0))
    return out.view(*x.shape[:-1], weight.shape[0])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-group products ``x [T, g, K]`` by the groups of ``weight [g·R, K]`` -> ``[T, g, R]``."""
    t, g, _ = x.shape
    w = weight.view(g, -1, weight.shape[-1])  # [g, R, K]
    out = torch.empty(t, g, w.shape[1], dtype=x.dtype, device=x.device)
    _launch(x.transpose(0, 1), w, out.transpose(0, 1))  # the groups: a grid axis
    return out
