"""Batch-invariant numerics: results for a row that do not depend on how many rows share the call.

A BLAS matmul may pick a different kernel for a different number of rows, and a vectorised
transcendental (exp, sigmoid, cos …) rounds differently from its scalar tail loop, so a token's
numbers can change in the last bits with the size of the batch it was computed in. These helpers
remove both effects when ``invariant`` is set: products run in tiles of exactly ``TILE`` rows, and
pointwise functions see inputs padded to whole vectors. A rollout's logprobs then equal, bit for bit,
the trainer's recomputation of the same tokens (RL's "true on-policy" mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.core.interfaces import KernelSet, StepMode

__all__ = ["TILE", "KernelChoice", "pointwise", "rowwise_linear", "token_logprobs"]

TILE = 16
_LANES = 64  # a multiple of every CPU vector width torch uses (in float32 elements)


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, invariant: bool) -> torch.Tensor:
    """``x @ weight^T`` (``x [..., K]``, ``weight [N, K]``); batch-invariant when ``invariant``."""
    if not invariant:
        return F.linear(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    t = rows.shape[0]
    pad = (-t) % TILE
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    tiles = rows.view(-1, TILE, k)
    out = torch.bmm(tiles, weight.t().unsqueeze(0).expand(tiles.shape[0], -1, -1))
    return out.reshape(-1, weight.shape[0])[:t].reshape(*lead, weight.shape[0])


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """``fn(x)`` for an elementwise transcendental ``fn``; batch-invariant when ``invariant`` (the
    input is padded to whole vectors so every element takes the vector code path)."""
    if not invariant:
        return fn(x)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % _LANES
    out = fn(F.pad(flat, (0, pad)) if pad else flat)
    return (out[: flat.numel()] if pad else out).view(x.shape)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, invariant: bool = False) -> torch.Tensor:
    """``log_softmax(logits)[i, tokens[i]]`` for ``logits [N, V]``: the one function rollouts and the
    trainer both use, so their logprobs can agree exactly (row tiles of fixed shape when invariant)."""
    logits = logits.float()
    if not invariant:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        pad = (-logits.shape[0]) % TILE
        rows = F.pad(logits, (0, 0, 0, pad)) if pad else logits
        lse = torch.cat([torch.logsumexp(tile, dim=-1) for tile in torch.split(rows, TILE)])[: logits.shape[0]]
    return logits.gather(1, tokens.reshape(-1, 1)).squeeze(1) - lse


@dataclass(slots=True)
class KernelChoice:
    """A model's kernel set for each step mode, chosen once; :meth:`for_step` picks the one of a step.

    A step is batch-invariant while :attr:`invariant` is set, else it runs with autograd when torch's
    grad mode is on and for inference when it is off.
    """

    autograd: KernelSet
    inference: KernelSet
    batch_invariant: KernelSet
    invariant: bool = False  # every step batch-invariant (true on-policy RL)

    def for_step(self) -> KernelSet:
        """The kernel set of a step starting now."""
        if self.invariant:
            return self.batch_invariant
        return self.autograd if torch.is_grad_enabled() else self.inference

    def names(self) -> dict[StepMode, str]:
        """Mode -> kernel-set name."""
        return {"autograd": self.autograd.name, "inference": self.inference.name,
                "batch_invariant": self.batch_invariant.name}
