# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-decorators
# (@triton.jit kernels: Triton reads their parameters' annotations itself)
"""mHC (manifold-constrained hyper-connections) in two kernels per collapse and one per expansion.

``hc_pre``/``hc_head``: the mixing product of the flattened streams with the RMS scale
(:func:`_hc_mix_kernel`, a skinny tiled matmul), then one pass per tile of tokens that turns the
logits into ``pre`` (and for ``hc_pre`` ``post`` and the Sinkhorn-normalised ``comb``, all in
registers) and collapses the streams (:func:`_hc_collapse_kernel`). ``hc_post``:
:func:`_hc_post_kernel`. The arithmetic is :mod:`dsv4.kernels.mhc`'s, in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_triton.ops import block

__all__ = ["hc_head", "hc_post", "hc_pre"]

_BLOCK_T = 16  # tokens per program


@triton.jit
def _hc_mix_kernel(
    h_ptr, fn_ptr, m_ptr, T, K, M, stride_h, stride_fn, eps,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``m [T, M] = (v @ fn^T) · rsqrt(mean(v²) + eps)`` for the flattened streams ``v [T, K]``."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(h_ptr + t[:, None] * stride_h + k[None, :], mask=(t[:, None] < T) & (k[None, :] < K),
                    other=0.0).to(tl.float32)  # [BT, BK]
        f = tl.load(fn_ptr + rm[None, :] * stride_fn + k[:, None], mask=(k[:, None] < K) & (rm[None, :] < M),
                    other=0.0).to(tl.float32)  # [BK, BM]
        acc = tl.dot(v, f, acc, input_precision="ieee")
        squares += tl.sum(v * v, axis=1)
    acc = acc * tl.math.rsqrt(squares / K + eps)[:, None]
    tl.store(m_ptr + t[:, None] * M + rm[None, :], acc, mask=(t[:, None] < T) & (rm[None, :] < M))


@triton.jit
def _hc_collapse_kernel(
    m_ptr, h_ptr, base_ptr, scale_ptr, x_ptr, post_ptr, comb_ptr, T, D, M, stride_ht, stride_hn, stride_x,
    hc_eps, sinkhorn_iters,
    N: tl.constexpr, FULL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """From the mixing logits ``m [T, M]`` of a tile of tokens: ``pre = σ(m[:N]·s0 + b[:N]) + eps`` and
    the collapse ``x = Σ_j pre_j · h_j``. With ``FULL`` (hc_pre) also ``post = 2σ(m[N:2N]·s1 + b[N:2N])``
    and ``comb = sinkhorn(softmax(m[2N:]·s2 + b[2N:]) + eps)``: columns first, then rows and columns
    alternately, ``2·iters − 1`` normalisations ``x / (Σ + eps)`` in all."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = t < T
    j = tl.arange(0, BLOCK_N)
    jmask = j < N
    mask = tmask[:, None] & jmask[None, :]  # [BT, BN]
    logits = tl.load(m_ptr + t[:, None] * M + j[None, :], mask=mask, other=0.0)
    pre = tl.sigmoid(logits * tl.load(scale_ptr) + tl.load(base_ptr + j, mask=jmask, other=0.0)[None, :]) + hc_eps
    pre = tl.where(mask, pre, 0.0)
    if FULL:
        logits = tl.load(m_ptr + t[:, None] * M + N + j[None, :], mask=mask, other=0.0)
        post = 2 * tl.sigmoid(logits * tl.load(scale_ptr + 1) + tl.load(base_ptr + N + j, mask=jmask)[None, :])
        tl.store(post_ptr + t[:, None] * N + j[None, :], post, mask=mask)
        jk = j[:, None] * N + j[None, :]  # [BN, BN]: flat index of comb[j, k]
        cmask = jmask[:, None] & jmask[None, :]
        logits = tl.load(m_ptr + t[:, None, None] * M + 2 * N + jk[None], mask=tmask[:, None, None] & cmask[None],
                         other=0.0)  # [BT, BN, BN]
        logits = logits * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N + jk, mask=cmask, other=0.0)[None]
        logits = tl.where(cmask[None], logits, -1e30)  # padding: weight 0 in real rows, zeroed below
        e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
        comb = tl.where(cmask[None], e / tl.sum(e, axis=2)[:, :, None] + hc_eps, 0.0)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns (over j)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)  # rows (over k)
            comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)  # columns
        tl.store(comb_ptr + t[:, None, None] * (N * N) + jk[None], comb, mask=tmask[:, None, None] & cmask[None])
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        h = tl.load(h_ptr + t[:, None, None] * stride_ht + j[None, :, None] * stride_hn + d[None, None, :],
                    mask=mask[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)  # [BT, BN, BD]
        x = tl.sum(pre[:, :, None] * h, axis=1)
        tl.store(x_ptr + t[:, None] * stride_x + d[None, :], x.to(x_ptr.dtype.element_ty),
                 mask=tmask[:, None] & dmask[None, :])


def _mix(h: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """Mixing logits ``m [T, rows]`` of ``fn [rows, n·D]`` for the streams ``h [T, n, D]`` (contiguous, T > 0)."""
    t, k, rows = h.shape[0], h.shape[1] * h.shape[2], fn.shape[0]
    m = torch.empty(t, rows, dtype=torch.float32, device=h.device)
    fn = fn.contiguous()
    _hc_mix_kernel[(triton.cdiv(t, _BLOCK_T),)](
        h, fn, m, t, k, rows, h.stride(0), fn.stride(0), rms_eps,
        BLOCK_T=_BLOCK_T, BLOCK_M=block(rows, 16, 1 << 16), BLOCK_K=block(k, 16, 64),
    )
    return m


def _collapse(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
    post: torch.Tensor | None, comb: torch.Tensor | None, *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
) -> None:
    """Fill ``x [T, D]`` and, for hc_pre, ``post [T, n]`` and ``comb [T, n, n]`` from streams ``h [T, n, D]``."""
    t, n, d = h.shape
    if t == 0:
        return
    m = _mix(h, fn, rms_eps)
    bn = block(n, 1, 1 << 16)
    _hc_collapse_kernel[(triton.cdiv(t, _BLOCK_T),)](
        m, h, base.float().contiguous(), scale.float().contiguous(), x, m if post is None else post,
        m if comb is None else comb, t, d, m.shape[1], h.stride(0), h.stride(1), x.stride(0), hc_eps, sinkhorn_iters,
        N=n, FULL=post is not None, BLOCK_T=_BLOCK_T, BLOCK_N=bn, BLOCK_D=block(d, 1, max(1, 4096 // (_BLOCK_T * bn))),
    )


def hc_pre(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
    *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse streams ``h [T, n, D]``: the sublayer input ``[T, D]``, ``post [T, n]``, ``comb [T, n, n]``."""
    t, n, d = h.shape
    h = h.contiguous()
    x = torch.empty(t, d, dtype=h.dtype, device=h.device)
    post = torch.empty(t, n, dtype=torch.float32, device=h.device)
    comb = torch.empty(t, n, n, dtype=torch.float32, device=h.device)
    _collapse(h, fn, base, scale, x, post, comb, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
    return x, post, comb


def hc_head(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, rms_eps: float, hc_eps: float,
) -> torch.Tensor:
    """Final collapse of the streams ``h [T, n, D] -> [T, D]`` (no post, no comb)."""
    h = h.contiguous()
    x = torch.empty(h.shape[0], h.shape[2], dtype=h.dtype, device=h.device)
    _collapse(h, fn, base, scale, x, None, None, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=0)
    return x


@triton.jit
def _hc_post_kernel(
    f_ptr, h_ptr, post_ptr, comb_ptr, out_ptr, T, D, stride_f, stride_ht, stride_hn, stride_ot, stride_on,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[t, k] = post[t, k] · f[t] + Σ_j comb[t, j, k] · h[t, j]`` for a tile of tokens and channels."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_N)
    tmask, dmask = t < T, d < D
    tk = tmask[:, None] & (k[None, :] < N)  # [BT, BN]
    td = tmask[:, None] & dmask[None, :]  # [BT, BD]
    post = tl.load(post_ptr + t[:, None] * N + k[None, :], mask=tk, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t[:, None] * stride_f + d[None, :], mask=td, other=0.0).to(tl.float32)
    acc = post[:, :, None] * f[:, None, :]  # [BT, BN, BD]
    for j in tl.static_range(N):
        c = tl.load(comb_ptr + t[:, None] * (N * N) + j * N + k[None, :], mask=tk, other=0.0).to(tl.float32)
        hj = tl.load(h_ptr + t[:, None] * stride_ht + j * stride_hn + d[None, :], mask=td, other=0.0).to(tl.float32)
        acc += c[:, :, None] * hj[:, None, :]
    out = out_ptr + t[:, None, None] * stride_ot + k[None, :, None] * stride_on + d[None, None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tk[:, :, None] & dmask[None, None, :])


def hc_post(f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams ``X'_k = post_k · f + Σ_j comb[j, k] · X_j`` -> ``[T, n, D]`` in ``h``'s dtype."""
    t, n, d = h.shape
    h, f, post, comb = h.contiguous(), f.contiguous(), post.contiguous(), comb.contiguous()
    out = torch.empty(t, n, d, dtype=h.dtype, device=h.device)
    if out.numel():
        bn = block(n, 1, 1 << 16)
        bd = block(d, 1, max(1, 4096 // (_BLOCK_T * bn)))
        _hc_post_kernel[(triton.cdiv(t, _BLOCK_T), triton.cdiv(d, bd))](
            f, h, post, comb, out, t, d, f.stride(0), h.stride(0), h.stride(1), out.stride(0), out.stride(1),
            N=n, BLOCK_T=_BLOCK_T, BLOCK_N=bn, BLOCK_D=bd,
        )
    return out
