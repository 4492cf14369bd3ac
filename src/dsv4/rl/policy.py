"""The trainer's side of a policy: logprobs of completions (with routing replay), weight sync, checksums."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import xxhash

from dsv4.core.batch import ForwardBatch, common_prefix
from dsv4.core.interfaces import RoutingTrace
from dsv4.core.numerics import token_logprobs
from dsv4.engine.outputs import Routing
from dsv4.rl import algorithms
from dsv4.model import Transformer
from dsv4.model.transformer import ModelOutput

__all__ = ["CompletionBatch", "WeightSyncError", "clone_model", "completion_logprobs", "sync_weights",
           "weights_checksum"]


class WeightSyncError(RuntimeError):
    """The engine does not serve the weights the trainer produced."""


@dataclass(slots=True)
class CompletionBatch:
    """Prompt + completion token sequences, and where each completion starts."""

    sequences: list[list[int]]
    prompt_lens: list[int]
    routing: list[Routing | None] | None = None

    def __post_init__(self) -> None:
        for seq, p in zip(self.sequences, self.prompt_lens, strict=True):
            if not 1 <= p < len(seq):
                raise ValueError(f"a sequence of {len(seq)} tokens with a prompt of {p} has no completion")


@dataclass(slots=True)
class _Layout:
    """How a :class:`CompletionBatch` is laid out as one forward: its requests (token lists, cached
    prefix lengths, in-batch parents), and for every completion token the row whose logits predict it."""

    tokens: list[list[int]]
    prefix_lens: list[int]
    parents: list[int] | None
    rows: list[list[int]]  # per sequence, per completion token: the batch row whose logits predict it
    # per request: (sequence whose routing record covers it, first recorded position, positions)
    records: list[tuple[int, int, int]]


def _layout(batch: CompletionBatch, share_prompts: bool) -> _Layout:
    """``share_prompts``: the distinct prompts' common start (a system prompt, a template; at least the
    BOS) is one request, each distinct prompt's rest another, and each completion a request whose prefix
    is its prompt (see ``ForwardBatch.parents``): every token is computed once. A completion's last token,
    which predicts nothing, is not fed. Otherwise every sequence is one whole request."""
    if not share_prompts:
        whole = [list(seq) for seq in batch.sequences]
        spans = [[(i, j) for j in range(p - 1, len(seq) - 1)]
                 for i, (seq, p) in enumerate(zip(batch.sequences, batch.prompt_lens, strict=True))]
        return _Layout(whole, [0] * len(whole), None, _flat(spans, whole),
                       [(i, 0, len(seq)) for i, seq in enumerate(batch.sequences)])
    pairs = list(zip(batch.sequences, batch.prompt_lens, strict=True))
    prompts: dict[tuple[int, ...], int] = {}  # distinct prompt -> the first sequence that has it
    for i, (seq, p) in enumerate(pairs):
        prompts.setdefault(tuple(seq[:p]), i)
    shared = common_prefix(list(prompts)) if len(prompts) > 1 else 0
    tokens: list[list[int]] = []
    prefix: list[int] = []
    parents: list[int] = []
    records: list[tuple[int, int, int]] = []

    def add(ids: list[int], start: int, parent: int, seq: int) -> int:
        tokens.append(ids)
        prefix.append(start)
        parents.append(parent)
        records.append((seq, start, len(ids)))
        return len(tokens) - 1

    top = add(list(next(iter(prompts))[:shared]), 0, -1, 0) if shared else -1
    owner = {key: top if len(key) == shared else add(list(key[shared:]), shared, top, first)
             for key, first in prompts.items()}
    rows = []
    for i, (seq, p) in enumerate(pairs):
        node = owner[tuple(seq[:p])]
        own = [(node, p - 1 - prefix[node])]  # the prompt's last row predicts the first token
        if len(seq) - p > 1:  # the completion's tokens but its last
            child = add(list(seq[p:-1]), p, node, i)
            own += [(child, j) for j in range(len(seq) - p - 1)]
        rows.append(own)
    return _Layout(tokens, prefix, parents, _flat(rows, tokens), records)


def _flat(rows: list[list[tuple[int, int]]], tokens: list[list[int]]) -> list[list[int]]:
    """(request, offset) pairs as rows of the flat batch."""
    starts = [0]
    for t in tokens:
        starts.append(starts[-1] + len(t))
    return [[starts[r] + j for r, j in seq_rows] for seq_rows in rows]


def _replay(batch: CompletionBatch, layout: _Layout) -> RoutingTrace | None:
    """The recorded picks of every row of the layout's requests (positions past a record: -1, none imposed)."""
    if batch.routing is None or any(r is None for r in batch.routing):
        return None
    trace = RoutingTrace(replay=True)
    routes = [r for r in batch.routing if r is not None]
    for field_name, store in (("experts", trace.experts), ("indexer", trace.indexer)):
        layers = getattr(routes[0], field_name).keys()
        for layer in layers:
            rows = []
            for seq, first, n in layout.records:
                ids = getattr(routes[seq], field_name)[layer][first : first + n]
                missing = n - ids.shape[0]
                rows += [ids, ids.new_full((missing, ids.shape[1]), -1)] if missing > 0 else [ids]
            store[layer] = torch.cat(rows)
    return trace


def completion_logprobs(
    model: Transformer,
    batch: CompletionBatch,
    *,
    replay: bool = False,
    indexer_loss: bool = False,
    balance_loss: bool = False,
    share_prompts: bool = False,
) -> tuple[list[torch.Tensor], ModelOutput]:
    """Logprob of every completion token under ``model`` (one tensor per sequence), differentiable.

    Computed with :func:`dsv4.core.numerics.token_logprobs`, the same function the engine uses for
    the behaviour logprobs, in the model's numerics mode: with batch-invariant numerics on both sides
    the two agree bit for bit. ``replay`` imposes the recorded expert / indexer choices.
    ``share_prompts`` computes the prompts' common start once and each distinct prompt once for all its
    completions (a group's G completions cost one prompt, not G; the same logprobs and gradients up to
    summation order, and bit for bit in batch-invariant mode); the indexer's objective then counts
    those rows once. Also returns the forward's output (its auxiliary losses, ``balance_loss`` asking
    for the MoE balance loss, and its routed-token counts).
    """
    device = model.embed.weight.device
    layout = _layout(batch, share_prompts)
    fb = ForwardBatch.from_requests(layout.tokens, layout.prefix_lens, sample="all", device=device,
                                    parents=layout.parents)
    idx = torch.tensor([r for rows in layout.rows for r in rows], device=device)
    if share_prompts:  # logits of the predicting rows only
        fb = replace(fb, sample_index=idx)
    out = model.run(fb, routing=_replay(batch, layout) if replay else None, indexer_loss=indexer_loss,
                    balance_loss=balance_loss)
    logits = out.logits if share_prompts else out.logits[idx]
    targets = torch.tensor([t for seq, p in zip(batch.sequences, batch.prompt_lens, strict=True) for t in seq[p:]],
                           device=device)
    lp = token_logprobs(logits, targets, model.invariant)
    return list(torch.split(lp, [len(rows) for rows in layout.rows])), out


def completion_mtp_loss(model: Transformer, batch: CompletionBatch) -> torch.Tensor:
    """The MTP head's loss on the completion tokens of ``batch`` (its next-next-token cross entropy, as
    SFT trains it), on the main model's streams computed without gradients: training the policy with
    RL moves the streams the MTP block drafts from, and this keeps the block in tune with them (its
    drafts' acceptance). The loss still reaches the head and embedding the block shares with the
    policy; GRPO applies its gradient to the block's own weights only. One extra forward of the main
    model, with every sequence whole (a parent's last row would need one next token per child)."""
    device = model.embed.weight.device
    seqs = [seq[:-1] for seq in batch.sequences]  # rows with a next token
    with torch.no_grad():
        hidden = model.run(ForwardBatch.from_requests(seqs, sample="all", device=device)).hidden
    nxt = ForwardBatch.from_requests([seq[1:] for seq in batch.sequences], sample="all", device=device)
    logits = model.run_mtp(nxt, hidden).logits  # row j of a sequence predicts its token j + 2
    # as SFT trains it: rows from the prompt's last on (row prompt_len - 2 predicts the first completion
    # token, which the main model samples: a draft never comes from there)
    targets = torch.tensor([t for seq in batch.sequences for t in [*seq[2:], -1]], device=device)
    mask = torch.zeros(targets.shape[0], dtype=torch.bool)
    for start, seq, p in zip(nxt.starts_host, batch.sequences, batch.prompt_lens, strict=True):
        mask[start + p - 1 : start + len(seq) - 2] = True
    return algorithms.sft_loss(logits, targets, mask.to(device))


def weights_checksum(model: torch.nn.Module) -> str:
    """XXH3-128 of every parameter and buffer of the state dict (names, dtypes, shapes and bytes).

    A non-cryptographic hash is enough here (it detects weights that differ, it does not resist an
    adversary) and it runs at memory speed: ~0.4 ms for 10 MB where BLAKE2b took ~9 ms.
    """
    h = xxhash.xxh3_128()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


@torch.no_grad()
def sync_weights(src: torch.nn.Module, dst: torch.nn.Module) -> str:
    """Copy ``src``'s weights into ``dst`` in place and prove it: both checksums must agree."""
    dst_state = dst.state_dict()
    for name, t in src.state_dict().items():
        dst_state[name].copy_(t)
    want, got = weights_checksum(src), weights_checksum(dst)
    if want != got:
        raise WeightSyncError(f"engine weights checksum {got} differs from the trainer's {want}")
    return got


def clone_model(model: Transformer) -> Transformer:
    """An independent copy (its own parameters, backend and executor objects)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def pad(rows: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` padded values and the mask of real entries."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length), value)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask
