"""MTP speculative decoding: the checkpoint's own MTP block drafts tokens, the model verifies them in
the next step's forward, and every token kept is the one plain decoding would have drawn.

A speculating sequence ends each step with up to ``k`` draft tokens (:attr:`Sequence.draft_ids`). The
scheduler gives it ``1 + len(drafts)`` rows in the next step: its last token and the drafts. Row ``j``'s
logits are the target distribution ``p_j`` of the token after draft ``j`` (if drafts ``1 … j`` stand);
:func:`accept` walks the rows in order and samples each row's token exactly as plain decoding would,
from the sequence's own random stream; draft ``j + 1`` stands iff it is that token, and the first token
that differs ends the run (the one after the last draft, if all stand). Every emitted token is thus a
draw from its ``p_j`` given the tokens before it — the target distribution, with the plain path's very
random numbers: greedy or seeded, the tokens are those of decoding without drafts, whatever shares the
batch and whether or not speculation runs (up to the float noise between a forward of 1 + k rows and one
of 1 row; none in batch-invariant mode). A draft stands with probability ``p_j(d)``, which is what
rejection sampling with the deterministic (argmax) draft gives too.

Rollback is free by construction: every KV stream is an append-only log of rows at token positions
(window rows, open-block compressor rows; compressed entries and indexer keys once their block
closes), and a position's rows are read only once its token is computed. A rejected draft's rows sit
past ``num_computed`` and are written again when a real token reaches their position; its compressed
entry, too, is written again when that block closes.

The MTP block keeps its own window rows: the row at position ``p`` is computed from the main model's
streams at ``p`` and the token at ``p + 1``, so it exists once that token does (:class:`Drafter`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq

import torch
from torch import Tensor

from dsv4.core.batch import ForwardBatch
from dsv4.core.interfaces import KVPool
from dsv4.core.numerics import token_logprobs
from dsv4.engine.outputs import Logprob
from dsv4.engine.request import Sequence
from dsv4.engine.sampling import Sampler
from dsv4.model import Transformer

__all__ = ["Append", "Drafter", "accept"]


#: ``append(seq, token, logprobs, chosen_logprob)`` records a token that stands (the engine's
#: ``_append``) and returns whether the sequence goes on.
Append = Callable[[Sequence, int, dict[int, Logprob] | None, float], bool]


def accept(sampler: Sampler, logits: Tensor, seqs: Seq[Sequence], drafts: Seq[list[int]], append: Append, *,
           exact_logprobs: bool = False) -> list[int]:
    """Verify each sequence's drafts on its rows of ``logits`` (``1 + len(drafts[i])`` consecutive rows,
    in order) and ``append`` the tokens that stand, in order. Row ``j`` samples its token exactly as a
    plain step would, from the same random stream; the draft ``j + 1`` stands iff it is that token, and
    the first token that differs from its draft (or the one after the last draft) ends the run. A
    sequence's penalties and ``min_tokens`` see each token before the next row is judged; rows are
    judged position by position across the sequences, one batched sampler pass each. ``exact_logprobs``:
    chosen logprobs by the trainer's own function (batch-invariant RL). Returns how many drafts of each
    sequence stood."""
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
        result = sampler.sample(rows, [seqs[i].sampling for i in live])
        if exact_logprobs:
            tokens = torch.tensor(result.tokens, device=rows.device)
            result.chosen_logprob = token_logprobs(rows, tokens, True).tolist()
        still = []
        for r, i in enumerate(live):
            token = result.tokens[r]
            goes_on = append(seqs[i], token, result.logprobs[r], result.chosen_logprob[r])
            if j < len(drafts[i]) and token == drafts[i][j]:
                accepted[i] += 1
                if goes_on:
                    still.append(i)
        live = still
    return accepted


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
