"""Pure-PyTorch attention math shared by backends: block compression, indexer top-k, sink attention.

Every function works on gathered, per-query tensors with validity masks, so it serves a dense
training batch and a paged inference batch alike (spec §5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsv4.core.interfaces import KernelSet

__all__ = [
    "compress_entries",
    "dense_sink_attention",
    "indexer_kl",
    "indexer_scores",
    "indexer_topk",
    "select_topk",
    "rms_norm",
    "sink_attention",
    "sink_attention_parts",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x · rsqrt(mean(x²) + eps)`` computed in fp32."""
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def compress_entries(
    rows: torch.Tensor,
    valid: torch.Tensor,
    *,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    overlap: bool,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kernels: KernelSet,
) -> torch.Tensor:
    """Pool closed blocks into compressed entries ``[E, c]`` (spec §5.1).

    ``rows [E, coff·m, 2·coff·c]`` are the per-token ``[K | Z]`` projections of each block's slots:
    for ``overlap`` (ratio 4) the previous block's m tokens then the block's own m tokens, else just
    the block's m tokens. ``valid [E, coff·m]`` marks slots that exist (block 0 has no previous half).
    ``positions [E]`` is each block's first-token position, where its rope is applied. The entry's
    norm and rope are the step's ``kernels``' (its mode's arithmetic).
    """
    m, width = ape.shape
    kv, score = rows[..., :width], rows[..., width:]
    if overlap:
        c = width // 2
        keys = torch.cat((kv[:, :m, :c], kv[:, m:, c:]), dim=1)
        logits = torch.cat((score[:, :m, :c] + ape[:, :c], score[:, m:, c:] + ape[:, c:]), dim=1)
    else:
        keys, logits = kv, score + ape
    mask = ~valid.unsqueeze(-1)
    keys = keys.masked_fill(mask, 0.0)  # a missing slot may hold anything; it must weigh exactly 0
    weights = torch.softmax(logits.float().masked_fill(mask, float("-inf")), dim=1).to(keys.dtype)
    entries = kernels.rms_norm((keys * weights).sum(dim=1), norm_weight, eps)
    entries = kernels.rope(entries, kernels.rope_cis(positions, inv_freq))
    return finish(entries) if finish is not None else entries


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    topk: int,
    replay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lightning-indexer selection (spec §5.2).

    ``I[t, s] = Σ_h weights[t, h] · relu(q[t, h] · keys[t, s]) · c^-0.5`` over the visible entries
    ``keys [T, N, c]`` (``valid [T, N]``); returns the positions ``[T, k]`` of the top ``k = min(topk, N)``
    in the N axis, whether each pick is a visible entry (early queries see fewer than k), and the
    index scores of the picks (the logits of the indexer's training objective). ``replay [T, >=k]``
    imposes the picks of rows whose first entry is not -1 (routing replay).
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.relu(torch.bmm(q.float(), keys.float().transpose(1, 2))) * scale  # [T, n_I, N]
    index = (scores * weights.float().unsqueeze(-1)).sum(dim=1).masked_fill(~valid, float("-inf"))
    return select_topk(index, valid, topk, replay)


def select_topk(
    index: torch.Tensor, valid: torch.Tensor, topk: int, replay: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``min(topk, N)`` of masked scores ``index [T, N]`` (or the replayed picks), their
    visibility and scores."""
    k = min(topk, index.shape[-1])
    top = index.topk(k, dim=-1).indices
    picked_valid = valid.gather(1, top)
    if replay is not None:
        imposed = replay[:, :k]
        use = replay[:, :1] >= 0
        top = torch.where(use, imposed.clamp(min=0), top)
        picked_valid = torch.where(use, (imposed >= 0) & valid.gather(1, top), valid.gather(1, top))
    return top, picked_valid, index.gather(1, top)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index scores ``[T, N]`` of queries ``q [T, n_I, c]`` against keys ``keys [N, c]`` shared by all."""
    scale = q.shape[-1] ** -0.5
    scores = torch.relu(torch.matmul(q.float(), keys.float().t())) * scale  # [T, n_I, N]
    index: torch.Tensor = (scores * weights.float().unsqueeze(-1)).sum(dim=1)
    return index


def dense_sink_attention(
    q: torch.Tensor, kvs: list[torch.Tensor], masks: list[torch.Tensor], sink: torch.Tensor, scale: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sink attention of ``q [T, H, d]`` over key/value sets shared by all queries (``kvs[i] [L_i, d]``,
    visibility ``masks[i] [T, L_i]``). Returns ``o [T, H, d]`` and the probabilities per set."""
    scores = [
        torch.matmul(q, kv.t()).mul_(scale).masked_fill_(~m.unsqueeze(1), float("-inf"))  # [T, H, L_i]
        for kv, m in zip(kvs, masks, strict=True)
    ]
    sinks = sink.to(q.dtype).view(1, -1, 1).expand(q.shape[0], -1, 1)
    logits = torch.cat([*scores, sinks], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)
    parts = list(torch.split(probs, [s.shape[-1] for s in scores] + [1], dim=-1)[:-1])
    out = torch.matmul(parts[0], kvs[0])
    for p, kv in zip(parts[1:], kvs[1:], strict=True):
        out = out + torch.matmul(p, kv)
    return out, parts


def sink_attention(
    q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``o[t, h] = Σ_j e^{s_j} kv_j / (Σ_j e^{s_j} + e^{sink_h})`` over valid ``kv [T, J, d]``; ``q [T, H, d]``.

    Returns ``o [T, H, d]`` and the attention probabilities ``[T, H, J]``.
    """
    scores = torch.bmm(q, kv.transpose(1, 2)) * scale  # [T, H, J]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    sinks = sink.to(scores.dtype).view(1, -1, 1).expand(scores.shape[0], -1, 1)
    logits = torch.cat((scores, sinks), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.bmm(probs.to(kv.dtype), kv), probs


def sink_attention_parts(
    q: torch.Tensor, kvs: list[torch.Tensor], valids: list[torch.Tensor], sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`sink_attention` over the concatenation of ``kvs[i] [T, J_i, d]`` (``valids[i] [T, J_i]``)
    without building it: scores per part, one softmax over all of them, outputs summed per part.

    Saves copying every gathered row a second time (a decode step's window and entries), at the cost
    of a different summation order; inference only (no probabilities are returned).
    """
    scores = [
        torch.bmm(q, kv.transpose(1, 2)).mul_(scale).masked_fill_(~v.unsqueeze(1), float("-inf"))
        for kv, v in zip(kvs, valids, strict=True)
    ]
    sinks = sink.to(q.dtype).view(1, -1, 1).expand(q.shape[0], -1, 1)
    probs = torch.softmax(torch.cat([*scores, sinks], dim=-1), dim=-1)
    parts = torch.split(probs, [s.shape[-1] for s in scores] + [1], dim=-1)
    out = torch.bmm(parts[0].to(kvs[0].dtype), kvs[0])
    for p, kv in zip(parts[1:-1], kvs[1:], strict=True):
        out = torch.baddbmm(out, p.to(kv.dtype), kv)
    return out


def indexer_kl(
    probs: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The lightning indexer's training objective (DeepSeek-V3.2): ``KL(p_attn || softmax(I))``.

    ``probs [T, H, k]`` is the main attention's weight on the k selected entries (summed over heads
    and renormalised, no gradient), ``scores [T, k]`` the indexer's logits for them. Averaged over the
    queries that selected at least one visible entry.
    """
    target = probs.detach().float().sum(dim=1).masked_fill(~valid, 0.0)
    rows = valid.any(dim=1)
    if not bool(rows.any()):
        return scores.sum() * 0.0
    target = target[rows] / target[rows].sum(dim=1, keepdim=True).clamp_min(1e-30)
    logq = torch.log_softmax(scores[rows].float().masked_fill(~valid[rows], float("-inf")), dim=-1)
    kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logq), torch.zeros_like(target))
    return kl.sum(dim=1).mean()
