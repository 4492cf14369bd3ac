"""Interleaved partial RoPE with optional YaRN frequency blending (spec §2)."""

from __future__ import annotations

import math

import torch

from dsv4.core.numerics import pointwise
from dsv4.native import kernels

from dsv4.core.config import YarnScaling

__all__ = ["apply_rope", "rope_cis", "rope_inv_freq"]


def rope_inv_freq(rope_dim: int, base: float, yarn: YarnScaling | None) -> torch.Tensor:
    """Per-pair inverse frequencies ``[rope_dim // 2]`` (fp32), YaRN-blended when ``yarn`` is set.

    No mscale / attention factor: DeepSeek-V4 uses YaRN only to blend frequencies.
    """
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None:
        return freqs

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low: float = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep the original frequency (high-frequency pairs), 0: interpolate
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


def rope_cis(positions: torch.Tensor, inv_freq: torch.Tensor, invariant: bool = False) -> torch.Tensor:
    """Unit complex rotations ``[..., rope_dim // 2]`` (complex64) for integer ``positions [...]``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.complex(pointwise(torch.cos, angles, invariant), pointwise(torch.sin, angles, invariant))


def apply_rope(
    x: torch.Tensor, cis: torch.Tensor, *, inverse: bool = False, invariant: bool = False, native: bool = False
) -> torch.Tensor:
    """Rotate the trailing ``2 * cis.shape[-1]`` channels of ``x`` as interleaved pairs.

    ``x [N, ..., d]`` with ``cis [N, rd/2]`` (broadcast over the middle dims): pair ``(x_2i, x_2i+1)``
    is multiplied, as a complex number, by ``cis[i]``. ``inverse`` applies the conjugate rotation (used
    to de-rotate the attention output, whose V carried rope). ``invariant`` spells the product out in
    separately rounded real operations (a vectorised complex multiply may fuse them). ``native`` lets
    inference (no autograd, not invariant) use the fused CPU kernel (:mod:`dsv4.native`).
    """
    if native and not invariant and cis.dim() == 2 and kernels.supports(x):
        return kernels.rope(x, cis, inverse)
    rd = 2 * cis.shape[-1]
    cis = cis.reshape(cis.shape[:-1] + (1,) * (x.dim() - cis.dim()) + cis.shape[-1:])
    out = x.to(torch.float32, copy=True)
    if invariant:
        pairs_r = out[..., -rd:].view(*out.shape[:-1], rd // 2, 2)
        even, odd = pairs_r[..., 0].clone(), pairs_r[..., 1].clone()
        cos, sin = cis.real, (-cis.imag if inverse else cis.imag)
        pairs_r[..., 0] = even * cos - odd * sin
        pairs_r[..., 1] = even * sin + odd * cos
        return out.to(x.dtype)
    pairs = torch.view_as_complex(out[..., -rd:].view(*out.shape[:-1], rd // 2, 2))
    pairs.mul_(cis.conj() if inverse else cis)  # in place on the copy: rotates out's rope channels
    return out.to(x.dtype)
