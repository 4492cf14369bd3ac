"""MTP speculative decoding: the checkpoint's own MTP block drafts tokens, the model verifies them in
the next step's forward, and rejection sampling keeps exactly the distribution plain decoding samples.

A speculating sequence ends each step with up to ``k`` draft tokens (:attr:`Sequence.draft_ids`). The
scheduler gives it ``1 + len(drafts)`` rows in the next step: its last token and the drafts. Row ``j``'s
logits are the target distribution ``p_j`` of the token after draft ``j`` (if drafts ``1 … j`` stand);
:func:`accept` walks the rows in order, accepting draft ``j + 1`` with probability ``p_j(d)`` (greedy:
when it is the argmax), and at the first rejection samples from ``p_j`` with ``d`` removed. Drafts are
deterministic (the MTP block's argmax), so that is the textbook rule with a point-mass proposal:
``P(x) = p(d)·[x = d] + (1 - p(d))·p(x)/(1 - p(d))·[x ≠ d] = p(x)``. All drafts standing, the last
row samples a bonus token as a plain step would.

Rollback is free by construction: every KV stream is an append-only log of rows at token positions
(window rows, open-block compressor rows; compressed entries and indexer keys once their block
closes), and a position's rows are read only once its token is computed. A rejected draft's rows sit
past ``num_computed`` and are written again when a real token reaches their position; its compressed
entry, too, is written again when that block closes.

The MTP block keeps its own window rows: the row at position ``p`` is computed from the main model's
streams at ``p`` and the token at ``p + 1``, so it exists once that token does (:class:`Drafter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence as Seq

import torch
from torch import Tensor

from dsv4.core.batch import ForwardBatch
from dsv4.core.interfaces import KVPool
from dsv4.core.numerics import token_logprobs
from dsv4.engine.outputs import Logprob
from dsv4.engine.request import Sequence
from dsv4.engine.sampling import Sampler, SequenceSampling, processed_logits, race
from dsv4.model import Transformer

__all__ = ["Append", "Drafter", "accept"]


#: ``append(seq, token, logprobs, chosen_logprob)`` records a token that stands (the engine's
#: ``_append``) and returns whether the sequence goes on.
Append = Callable[[Sequence, int, dict[int, Logprob] | None, float], bool]


def accept(sampler: Sampler, logits: Tensor, seqs: Seq[Sequence], drafts: Seq[list[int]], append: Append, *,
           exact_logprobs: bool = False) -> list[int]:
    """Verify each sequence's drafts on its rows of ``logits`` (``1 + len(drafts[i])`` consecutive rows,
    in order) and ``append`` the tokens that stand, in order: accepted drafts, then the correction (at
    the first rejection) or the bonus token (all accepted). A sequence's penalties and ``min_tokens``
    see each token before the next row is judged; rows are judged position by position across the
    sequences, one batched sampler pass each. ``exact_logprobs``: chosen logprobs by the trainer's own
    function (batch-invariant RL). Returns how many drafts of each sequence stood."""
    offsets = [0]
    for d in drafts:
        offsets.append(offsets[-1] + 1 + len(d))
    if offsets[-1] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {offsets[-1]} rows of drafts")
    accepted = [0] * len(seqs)
    live = list(range(len(seqs)))
    for j in range(1 + max((len(d) for d in drafts), default=0)):
        live = [i for i in live if j <= len(drafts[i])]
        if not live:
            break
        rows = logits[torch.tensor([offsets[i] + j for i in live], device=logits.device)]
        samplings = [seqs[i].sampling for i in live]
        proposed = [drafts[i][j] if j < len(drafts[i]) else -1 for i in live]
        tokens = _judge(sampler.penalized_logits(rows, samplings), samplings, proposed)
        result = sampler.result(rows, tokens, samplings)
        if exact_logprobs:
            result.chosen_logprob = token_logprobs(rows, tokens, True).tolist()
        still = []
        for r, i in enumerate(live):
            token = result.tokens[r]
            goes_on = append(seqs[i], token, result.logprobs[r], result.chosen_logprob[r])
            if token == proposed[r]:
                accepted[i] += 1
                if goes_on:
                    still.append(i)
        live = still
    return accepted


def _judge(work: Tensor, seqs: Seq[SequenceSampling], proposed: list[int]) -> Tensor:
    """One token per row of penalised logits ``work [R, V]``: the proposed draft where it stands (greedy:
    it is the argmax; sampled: with probability ``p(draft)``), else a draw from ``p`` without the draft;
    rows proposing nothing (-1) sample plainly. Random numbers come from each row's own generator."""
    dev = work.device
    tokens = work.max(dim=-1).indices  # greedy rows: the argmax, standing or correcting
    sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if not sampled:
        return tokens
    sub = [seqs[r] for r in sampled]
    x = processed_logits(work[torch.tensor(sampled, device=dev)], sub)  # [S, V]: -inf outside the kept set
    logp = x.log_softmax(dim=-1)
    chosen = []
    for r, s, row, lp in zip(sampled, sub, x, logp, strict=True):
        d = proposed[r]
        if d >= 0:
            u = float(torch.rand(1, generator=s.generator))
            if u < math.exp(float(lp[d])):
                chosen.append(d)
                continue
            row = row.clone()
            row[d] = -math.inf  # the residual max(0, p - δ_d), renormalised
        chosen.append(int(race(row[None], [s])[0]))
    tokens[torch.tensor(sampled, device=dev)] = torch.tensor(chosen, device=dev)
    return tokens


class Drafter:
    """Runs the MTP block for speculating sequences: it keeps each one's MTP window rows (position ``p``
    from the main model's streams at ``p`` and token ``p + 1``) and drafts ``k`` tokens after its last.

    A sequence tracks ``mtp_computed`` (positions whose MTP row is written) and ``frontier`` (the main
    model's streams at its last computed position, ``num_computed - 1``). :meth:`extend` writes rows
    whose next token is known; :meth:`draft` then applies the block recursively from the last
    position, feeding its own streams back one position further on (as SGLang does with DeepSeek's
    single MTP block), writing rows past ``num_computed`` that the next real tokens overwrite.
    """

    def __init__(self, model: Transformer, pool: KVPool, num_tokens: int) -> None:
        if not len(model.mtp):
            raise ValueError("speculative='mtp' needs a checkpoint with an MTP block (num_nextn_predict_layers >= 1)")
        self.model, self.pool, self.k = model, pool, num_tokens

    def extend(self, work: list[tuple[Sequence, int, int, Tensor]]) -> tuple[list[Sequence], Tensor, Tensor] | None:
        """Write the MTP rows ``[first, stop)`` of each ``(seq, first, stop, hidden)``, where ``hidden`` holds
        the main model's streams at those positions and each position's next token is known; the
        sequence's ``mtp_computed`` becomes ``stop``. Returns the sequences, with the MTP logits ``[N, V]``
        and streams ``[N, n, D]`` of each one's last row (what :meth:`draft` starts from), or ``None``
        when there was nothing to write."""
        if not work:
            return None
        batch = ForwardBatch.from_requests([seq.tokens(first + 1, stop + 1) for seq, first, stop, _ in work],
                                           [first for _, first, _, _ in work], rids=[seq.seq_id for seq, *_ in work],
                                           sample="last", device=self.model.embed.weight.device)
        out = self.model.run_mtp(batch, torch.cat([h for *_, h in work]), self.pool)
        for seq, _, stop, _ in work:
            seq.mtp_computed = stop
        assert batch.sample_index is not None
        return [seq for seq, *_ in work], out.logits, out.hidden[batch.sample_index]

    def draft(self, seqs: list[Sequence], logits: Tensor, streams: Tensor) -> None:
        """Up to ``k`` drafts after each sequence's last token, from the MTP output of its last computed
        position (``logits [N, V]``, its streams ``[N, n, D]``): the argmax, then the block applied to
        its own streams and that draft, ``k - 1`` times. A sequence whose pages cannot grow drafts less."""
        tokens = logits.max(dim=-1).indices
        for seq, t in zip(seqs, tokens.tolist(), strict=True):
            seq.draft_ids = [t]
        for step in range(1, self.k):
            grow = []
            for i, seq in enumerate(seqs):
                try:  # the drafted rows sit past num_computed; the verifying step needs the same pages
                    self.pool.reserve(seq.seq_id, seq.num_computed + step)
                except MemoryError:
                    continue
                grow.append(i)
            if not grow:
                break
            seqs = [seqs[i] for i in grow]
            pick = torch.tensor(grow, device=streams.device)
            batch = ForwardBatch.from_requests([[seq.draft_ids[-1]] for seq in seqs],
                                               [seq.num_computed - 1 + step for seq in seqs],
                                               rids=[seq.seq_id for seq in seqs], sample="last",
                                               device=streams.device)
            out = self.model.run_mtp(batch, streams[pick], self.pool)
            streams = out.hidden
            for seq, t in zip(seqs, out.logits.max(dim=-1).indices.tolist(), strict=True):
                seq.draft_ids.append(t)
