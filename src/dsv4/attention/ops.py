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
    "indexer_scores_at",
    "indexer_topk",
    "indexer_topk_shared",
    "rank_keys",
    "rms_norm",
    "select_topk",
    "sink_attention",
    "sink_attention_parts",
    "unrank",
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


def rank_keys(index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys that order scores ``index`` of entries ``ids`` (broadcast against it) by score, ties to
    the lower id: a total order, so a top-k by it does not depend on how the scores are split up or in
    which order they arrive (``torch.topk`` breaks ties by its sorting algorithm's internals).

    The high 32 bits are the score's bits made order-preserving (``-0.0`` ranks as ``0.0``), the low 32
    bits ``2^32 - 1 - id``; :func:`unrank` reads both back."""
    bits = (index.detach().float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (0xFFFFFFFF - ids)


def unrank(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scores, ids)`` of :func:`rank_keys` keys."""
    ordered = (keys >> 32).to(torch.int32)
    scores = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).view(torch.float32)
    return scores, 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def select_topk(
    index: torch.Tensor, valid: torch.Tensor, topk: int, replay: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``min(topk, N)`` of masked scores ``index [T, N]`` (or the replayed picks), their
    visibility and scores. Picks are ranked by score, ties to the lower entry index (:func:`rank_keys`),
    best first; a row with fewer than k visible entries gets its lowest invisible ones after those."""
    k = min(topk, index.shape[-1])
    top = rank_keys(index, torch.arange(index.shape[-1], device=index.device)).topk(k, dim=-1).indices
    top, picked_valid = _replayed(top, valid.gather(1, top), replay, lambda picks: valid.gather(1, picks))
    return top, picked_valid, index.gather(1, top)


def _replayed(
    top: torch.Tensor,
    valid: torch.Tensor,
    replay: torch.Tensor | None,
    visible: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The picks ``top [T, k]`` (visibility ``valid``) with each row of ``replay`` whose first id is not
    -1 imposing its own (visible where ``visible(picks)`` and the imposed id is not -1)."""
    if replay is None:
        return top, valid
    imposed = replay[:, : top.shape[1]]
    use = replay[:, :1] >= 0
    top = torch.where(use, imposed.clamp(min=0), top)
    return top, torch.where(use, (imposed >= 0) & visible(top), valid)


def indexer_topk_shared(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    rows: torch.Tensor,
    limit: torch.Tensor,
    topk: int,
    replay: torch.Tensor | None = None,
    *,
    query_block: int = 256,
    key_block: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`indexer_topk` for queries that share their keys (one request's prefill chunk), streamed.

    Token t sees the first ``limit[t]`` of the keys ``keys[rows]`` (``rows [N]``: storage rows). Scores
    are computed for ``query_block`` queries against ``key_block`` keys at a time and folded into a
    running top-k, so memory stays O(query_block · (n_I · key_block + k)) whatever N is; the picks are
    :func:`select_topk`'s over whole rows (its ranking is a total order). The scores returned are the
    selection's, without a graph; where replayed picks or an objective need theirs, see
    :func:`indexer_scores_at`.
    """
    n = rows.shape[0]
    k = min(topk, n)
    ranked: list[torch.Tensor] = []
    with torch.no_grad():
        for q0 in range(0, q.shape[0], query_block):
            qb, wb = q[q0 : q0 + query_block], weights[q0 : q0 + query_block]
            seen = limit[q0 : q0 + query_block].unsqueeze(1)
            best = None  # [b, <= k] rank keys of the best picks so far
            for s0 in range(0, n, key_block):
                ids = torch.arange(s0, min(n, s0 + key_block), device=q.device)
                index = indexer_scores(qb, wb, keys.index_select(0, rows[s0 : s0 + key_block]))  # [b, B]
                block = rank_keys(index.masked_fill(ids >= seen, float("-inf")), ids)
                if best is not None:
                    block = torch.cat((best, block), dim=1)
                best = block.topk(min(k, block.shape[1]), dim=-1).values
            assert best is not None
            ranked.append(best)
    scores, top = unrank(torch.cat(ranked))
    bound = limit.unsqueeze(1)
    top, valid = _replayed(top, top < bound, replay, lambda picks: picks < bound)
    return top, valid, scores


def indexer_scores_at(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, top: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Index scores ``[T, k]`` of the picks ``top`` (entries of the shared keys ``keys[rows]``), ``-inf``
    where not ``valid``: the indexer objective's logits, with their graph."""
    return indexer_scores(q, weights, keys[rows[top]]).masked_fill(~valid, float("-inf"))


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index scores ``[T, N]`` of queries ``q [T, n_I, c]`` against keys ``keys [N, c]`` shared by all, or
    ``[T, N, c]``, each query its own."""
    scale = q.shape[-1] ** -0.5
    if keys.dim() == 2:
        product = torch.matmul(q.float(), keys.float().t())
    else:
        product = torch.bmm(q.float(), keys.float().transpose(1, 2))
    scores = torch.relu(product) * scale  # [T, n_I, N]
    index: torch.Tensor = (scores * weights.float().unsqueeze(-1)).sum(dim=1)
    return index


def dense_sink_attention(
    q: torch.Tensor, kvs: list[torch.Tensor], masks: list[torch.Tensor], sink: torch.Tensor, scale: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sink attention of ``q [T, H, d]`` over key/value sets, each shared by all queries (``kvs[i]
    [L_i, d]``) or per query (``[T, L_i, d]``), with visibility ``masks[i] [T, L_i]``. Returns
    ``o [T, H, d]`` and the probabilities per set."""
    scores = [
        torch.matmul(q, kv.transpose(-1, -2)).mul_(scale).masked_fill_(~m.unsqueeze(1), float("-inf"))  # [T, H, L_i]
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
