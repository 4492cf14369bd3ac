"""The PyTorch kernel sets: ``reference`` (autograd and inference) and ``batch_invariant``.

``reference`` is the arithmetic the model is specified and trained with; in inference it takes fused
forms of the same products where no gradient is needed (one ``bmm`` for the mHC collapse, the mHC
add folded into a ``baddbmm``, one ``einsum`` for the grouped output projection). ``batch_invariant``
computes every product in fixed row tiles and every transcendental on whole vectors
(:mod:`dsv4.core.numerics`), so a row's numbers do not depend on the rows beside it: a rollout's
logprobs then equal the trainer's recomputation bit for bit. Both run on any device torch supports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dsv4.attention.ops import rms_norm
from dsv4.attention.rope import apply_rope, rope_cis
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import STEP_MODES, LinearWeights, StepMode
from dsv4.core.numerics import pointwise, rowwise_linear, token_logprobs
from dsv4.kernels import mhc

__all__ = ["BatchInvariantKernels", "ReferenceKernels", "stacked_weight"]


def stacked_weight(layer: LinearWeights) -> torch.Tensor:
    """``W``: the layer's weights with their rows stacked. Without autograd the stacked copy is kept in
    ``layer.cache`` until a weight changes (an optimizer step or a weight sync bumps its version)."""
    ws = layer.weights
    if len(ws) == 1:
        return ws[0]
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return torch.cat(list(ws))
    key = tuple((w.data_ptr(), 0 if w.is_inference() else int(getattr(w, "_version")), w.device) for w in ws)
    hit = layer.cache.get("stacked")
    if hit is None or hit[0] != key:
        hit = layer.cache["stacked"] = (key, torch.cat([w.detach() for w in ws]))
    weight: torch.Tensor = hit[1]
    return weight


class ReferenceKernels:
    """Pure-PyTorch hot ops for training and inference."""

    name: ClassVar[str] = "reference"
    capabilities: ClassVar[frozenset[str]] = frozenset({"autograd", "inference", "cpu", "cuda"})

    def __init__(
        self,
        config: ModelConfig | None = None,
        device: torch.device | str = "cpu",
        mode: StepMode = "autograd",
        *,
        max_context: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        problem = type(self).refuse(config, torch.device(device), mode)
        if problem is not None:
            raise ValueError(f"kernel set {self.name!r}: {problem}")
        self.mode: StepMode = mode
        self.max_context = max_context
        self._invariant = mode == "batch_invariant"
        self._inference = mode == "inference"

    @classmethod
    def refuse(cls, config: ModelConfig | None, device: torch.device, mode: StepMode) -> str | None:
        """Serves every configuration and device in the modes of its capabilities."""
        if mode not in cls.capabilities:
            return f"does not compute {mode!r} steps (it serves {[m for m in STEP_MODES if m in cls.capabilities]})"
        return None

    def linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """``x @ weight^T``."""
        return rowwise_linear(x, stacked_weight(layer), self._invariant)

    def grouped_linear(self, x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
        """``x [T, g, K]`` by the groups of ``weight [g·R, K]`` -> ``[T, g, R]``."""
        g = x.shape[1]
        w = stacked_weight(layer).view(g, -1, x.shape[-1])  # [g, R, K]
        if self._invariant:
            return torch.stack([rowwise_linear(x[:, i], w[i], True) for i in range(g)], dim=1)
        return torch.einsum("tgi,gri->tgr", x, w)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """RMSNorm in fp32 (``weight=None``: the per-head query norm, scaled in ``x``'s dtype)."""
        if weight is None:
            return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
        return rms_norm(x, weight, eps)

    def rope_cis(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations of ``positions``."""
        return rope_cis(positions, inv_freq, self._invariant)

    def rope(self, x: torch.Tensor, cis: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """Interleaved partial RoPE."""
        return apply_rope(x, cis, inverse=inverse, invariant=self._invariant)

    def hc_pre(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
        *, rms_eps: float, hc_eps: float, sinkhorn_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC collapse (:func:`dsv4.kernels.mhc.hc_pre`)."""
        return mhc.hc_pre(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters,
                          invariant=self._invariant, inference=self._inference)

    def hc_post(self, f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """mHC expansion (:func:`dsv4.kernels.mhc.hc_post`)."""
        return mhc.hc_post(f, h, post, comb, invariant=self._invariant, inference=self._inference)

    def hc_head(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, rms_eps: float,
        hc_eps: float,
    ) -> torch.Tensor:
        """Final mHC collapse (:func:`dsv4.kernels.mhc.hc_head`)."""
        return mhc.hc_head(h, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, invariant=self._invariant)

    def router_scores(self, x: torch.Tensor, weight: torch.Tensor, score_func: str) -> torch.Tensor:
        """Affinities in fp32."""
        logits = rowwise_linear(x.float(), weight.float(), self._invariant)
        if score_func == "sqrtsoftplus":
            return torch.sqrt(pointwise(F.softplus, logits, self._invariant))
        if score_func == "sigmoid":
            return pointwise(torch.sigmoid, logits, self._invariant)
        return torch.softmax(logits, dim=-1)

    def route(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, imposed: torch.Tensor | None,
        *, score_func: str, top_k: int, route_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores in fp32, top-k of ``scores + bias`` (or the imposed ids), weights from the scores."""
        scores = self.router_scores(x, weight, score_func)
        if bias is None:  # hash routing: every row's experts are imposed
            if imposed is None:
                raise ValueError("a router without a selection bias needs imposed expert ids (hash routing)")
            idx = imposed
        else:
            idx = torch.topk(scores + bias, top_k, dim=-1).indices
            if imposed is not None:
                idx = torch.where(imposed[:, :1] >= 0, imposed, idx)
        weights = scores.gather(1, idx)
        if score_func != "softmax":  # as DeepSeek's reference: renormalise unless softmax-scored
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * route_scale, idx

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
        """Clamped SwiGLU."""
        if limit > 0:
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return pointwise(F.silu, gate, self._invariant) * up

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Chosen-token logprobs (:func:`dsv4.core.numerics.token_logprobs`)."""
        return token_logprobs(logits, tokens, self._invariant)


class BatchInvariantKernels(ReferenceKernels):
    """The reference arithmetic with every row's numbers independent of its batch (with or without
    autograd): products in tiles of :data:`dsv4.core.numerics.TILE` rows, transcendentals on whole
    vectors, elementwise mHC mixing. Slower; what true on-policy RL runs on both sides."""

    name: ClassVar[str] = "batch_invariant"
    capabilities: ClassVar[frozenset[str]] = frozenset({"batch_invariant", "cpu", "cuda"})

