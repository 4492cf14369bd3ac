"""Manifold-constrained hyper-connections (mHC): n residual streams mixed around each sublayer (spec §4)."""

from __future__ import annotations

import torch

from dsv4.core.numerics import pointwise, rowwise_linear
from dsv4.native import kernels

__all__ = ["hc_head", "hc_mix", "hc_post", "hc_pre"]


def hc_mix(h: torch.Tensor, fn: torch.Tensor, rms_eps: float, invariant: bool = False) -> torch.Tensor:
    """Mixing logits ``m [T, rows] = (flatten(h) @ fn^T) · rsqrt(mean(flatten(h)²) + eps)`` in fp32."""
    v = h.flatten(-2).float()  # [T, n*D]
    r = torch.rsqrt(v.square().mean(-1, keepdim=True) + rms_eps)
    return rowwise_linear(v, fn.float(), invariant) * r


def hc_pre(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    *,
    rms_eps: float,
    hc_eps: float,
    sinkhorn_iters: int,
    invariant: bool = False,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse streams ``h [T, n, D]`` into the sublayer input; also return ``post [T, n]``, ``comb [T, n, n]``.

    ``native`` lets inference (no autograd, not ``invariant``) run it all in one fused CPU kernel
    (:mod:`dsv4.native`) when it applies.
    """
    n = h.shape[-2]
    if native and not invariant and h.shape[-1] % 16 == 0 and n <= 16 and kernels.supports(h, fn, base, scale):
        return kernels.hc_pre(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
    m = hc_mix(h, fn, rms_eps, invariant)
    base = base.float()
    pre = pointwise(torch.sigmoid, m[:, :n] * scale[0] + base[:n], invariant) + hc_eps
    post = 2 * pointwise(torch.sigmoid, m[:, n : 2 * n] * scale[1] + base[n : 2 * n], invariant)
    logits = m[:, 2 * n :].view(-1, n, n) * scale[2] + base[2 * n :].view(n, n)
    comb = torch.softmax(logits, dim=-1) + hc_eps
    if torch.is_grad_enabled() and comb.requires_grad:
        # Sinkhorn–Knopp towards a doubly-stochastic matrix: columns first, then rows/columns alternately.
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    else:
        _sinkhorn_inplace(comb, sinkhorn_iters, hc_eps)
    if invariant or torch.is_grad_enabled():
        x = (pre.unsqueeze(-1) * h).sum(dim=-2).to(h.dtype)
    else:  # inference: one small batched product instead of a broadcast and a reduction
        x = torch.bmm(pre.unsqueeze(-2), h.float()).squeeze(-2).to(h.dtype)
    return x, post, comb


def _sinkhorn_inplace(comb: torch.Tensor, iters: int, eps: float) -> None:
    """The Sinkhorn–Knopp loop of :func:`hc_pre` without autograd, in place: the same arithmetic
    (bit for bit) with three kernels and no allocation per half-step; the loop is ~120 tiny ops per
    sublayer, so allocation and dispatch are most of its cost."""
    cols = comb.new_empty(*comb.shape[:-2], 1, comb.shape[-1])
    rows = comb.new_empty(*comb.shape[:-1], 1)
    torch.sum(comb, dim=-2, keepdim=True, out=cols)
    comb.div_(cols.add_(eps))
    for _ in range(iters - 1):
        torch.sum(comb, dim=-1, keepdim=True, out=rows)
        comb.div_(rows.add_(eps))
        torch.sum(comb, dim=-2, keepdim=True, out=cols)
        comb.div_(cols.add_(eps))


def hc_post(
    f: torch.Tensor,
    h: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    invariant: bool = False,
    native: bool = False,
) -> torch.Tensor:
    """New streams ``X'_k = post_k · f + Σ_j comb[j, k] · X_j`` (comb is consumed transposed); ``native``
    as in :func:`hc_pre`."""
    if native and not invariant and h.shape[-2] <= 16 and kernels.supports(f, h, post, comb):
        return kernels.hc_post(f, h, post, comb)
    comb = comb.to(h.dtype)
    if invariant:  # elementwise: a batched matmul's kernel may change with the number of rows
        mixed = (comb.unsqueeze(-1) * h.unsqueeze(-2)).sum(dim=-3)  # [T, j, k, D] summed over j
    elif not torch.is_grad_enabled():  # inference: the add fused into the product
        return torch.baddbmm(post.to(h.dtype).unsqueeze(-1) * f.unsqueeze(-2), comb.transpose(-1, -2), h)
    else:
        mixed = torch.matmul(comb.transpose(-1, -2), h)  # [T, n, D]
    return post.to(h.dtype).unsqueeze(-1) * f.unsqueeze(-2) + mixed


def hc_head(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    *,
    rms_eps: float,
    hc_eps: float,
    invariant: bool = False,
) -> torch.Tensor:
    """Final collapse of the streams ``h [T, n, D] -> [T, D]`` (no post, no comb)."""
    m = hc_mix(h, fn, rms_eps, invariant)
    pre = pointwise(torch.sigmoid, m * scale.float() + base.float(), invariant) + hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=-2).to(h.dtype)
