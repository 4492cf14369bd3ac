"""Manifold-constrained hyper-connections (mHC) in PyTorch: n residual streams mixed around each sublayer (spec §4).

The arithmetic of the ``reference`` and ``batch_invariant`` kernel sets (:mod:`dsv4.kernels.reference`);
``inference`` takes a fused form of the same products where no gradient is needed, ``invariant`` the
batch-invariant one.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from loguru import logger
from torch.autograd.function import once_differentiable

from dsv4.core.numerics import pointwise, rowwise_linear
from dsv4.native import available as native_available
from dsv4.native import kernels

__all__ = ["hc_head", "hc_mix", "hc_post", "hc_pre", "sinkhorn"]


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
    inference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse streams ``h [T, n, D]`` into the sublayer input; also return ``post [T, n]``, ``comb [T, n, n]``."""
    n = h.shape[-2]
    m = hc_mix(h, fn, rms_eps, invariant)
    base = base.float()
    pre = pointwise(torch.sigmoid, m[:, :n] * scale[0] + base[:n], invariant) + hc_eps
    post = 2 * pointwise(torch.sigmoid, m[:, n : 2 * n] * scale[1] + base[n : 2 * n], invariant)
    logits = m[:, 2 * n :].view(-1, n, n) * scale[2] + base[2 * n :].view(n, n)
    comb = sinkhorn(torch.softmax(logits, dim=-1) + hc_eps, sinkhorn_iters, hc_eps)
    if inference:  # one small batched product instead of a broadcast and a reduction
        x = torch.bmm(pre.unsqueeze(-2), h.float()).squeeze(-2).to(h.dtype)
    else:
        x = (pre.unsqueeze(-1) * h).sum(dim=-2).to(h.dtype)
    return x, post, comb


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn–Knopp of ``comb [T, n, n]`` towards a doubly-stochastic matrix: columns first, then
    rows and columns alternately (``2·iters − 1`` normalisations ``x / (x.sum(dim) + eps)``).

    ~120 tiny ops forward and ~250 backward per sublayer in PyTorch, so where the native kernels
    reproduce PyTorch's arithmetic bit for bit (:func:`_exact_kernel`: float32 CPU, n <= 4, checked
    once per process against this loop) the loop and its gradient run in one kernel call each; the
    numbers are the same either way, for training, inference and batch-invariant mode alike.
    """
    if _exact_kernel(comb):
        if torch.is_grad_enabled() and comb.requires_grad:
            out: torch.Tensor = _SinkhornFunction.apply(comb, iters, eps)  # type: ignore[no-untyped-call]
            return out
        return kernels.sinkhorn(comb, iters, eps)[0]
    if torch.is_grad_enabled() and comb.requires_grad:
        return _sinkhorn_loop(comb, iters, eps)
    comb = comb.clone()
    _sinkhorn_inplace(comb, iters, eps)
    return comb


def _sinkhorn_loop(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class _SinkhornFunction(torch.autograd.Function):
    """:func:`sinkhorn` with autograd through the native forward and backward kernels."""

    @staticmethod
    def forward(ctx: Any, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        out, saved = kernels.sinkhorn(comb, iters, eps, save=True)
        ctx.save_for_backward(comb, saved)
        ctx.iters, ctx.eps = iters, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        comb, saved = ctx.saved_tensors
        return kernels.sinkhorn_backward(comb, saved, grad, ctx.iters, ctx.eps), None, None


_EXACT_MAX_STREAMS = 4  # PyTorch sums 1-4 elements in order; longer sums in an order of its own


def _exact_kernel(comb: torch.Tensor) -> bool:
    return (
        comb.dtype == torch.float32
        and comb.device.type == "cpu"
        and comb.dim() == 3
        and comb.shape[-1] == comb.shape[-2] <= _EXACT_MAX_STREAMS
        and _kernel_matches_loop()
    )


@functools.cache
def _kernel_matches_loop() -> bool:
    """Whether the native Sinkhorn equals :func:`_sinkhorn_loop` and its autograd gradient bit for bit
    on this machine (values and gradients of random inputs, every n the kernel path takes)."""
    if not native_available():
        return False
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the first caller is in
        for n in range(1, _EXACT_MAX_STREAMS + 1):
            for t, iters in ((1, 1), (37, 2), (64, 20)):
                comb = (torch.softmax(torch.randn(t, n, n, generator=g) * 4, dim=-1) + 1e-6).requires_grad_(True)
                grad = torch.randn(t, n, n, generator=g)
                ref = _sinkhorn_loop(comb, iters, 1e-6)
                (want,) = torch.autograd.grad(ref, comb, grad)
                out, saved = kernels.sinkhorn(comb.detach(), iters, 1e-6, save=True)
                assert saved is not None
                back = kernels.sinkhorn_backward(comb.detach(), saved, grad, iters, 1e-6)
                if not (torch.equal(out, ref.detach()) and torch.equal(back, want)):
                    logger.warning("dsv4 native Sinkhorn differs from PyTorch's arithmetic here; using PyTorch")
                    return False
    return True


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
    *,
    invariant: bool = False,
    inference: bool = False,
) -> torch.Tensor:
    """New streams ``X'_k = post_k · f + Σ_j comb[j, k] · X_j`` (comb is consumed transposed)."""
    comb = comb.to(h.dtype)
    if invariant:  # elementwise: a batched matmul's kernel may change with the number of rows
        mixed = (comb.unsqueeze(-1) * h.unsqueeze(-2)).sum(dim=-3)  # [T, j, k, D] summed over j
    elif inference:  # the add fused into the product
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
