"""The trainer's side of a policy: logprobs of completions (with routing replay), weight sync, checksums."""

from __future__ import annotations

import copy
import hashlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.core.batch import ForwardBatch
from dsv4.core.interfaces import RoutingTrace
from dsv4.core.numerics import token_logprobs
from dsv4.engine.outputs import Routing
from dsv4.model import Transformer

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


def _replay(batch: CompletionBatch) -> RoutingTrace | None:
    """Each sequence's recorded picks (positions 0 … len-2) plus an empty row for its last token."""
    if batch.routing is None or any(r is None for r in batch.routing):
        return None
    trace = RoutingTrace(replay=True)
    routes = [r for r in batch.routing if r is not None]
    for field_name, store in (("experts", trace.experts), ("indexer", trace.indexer)):
        layers = getattr(routes[0], field_name).keys()
        for layer in layers:
            rows = []
            for seq, r in zip(batch.sequences, routes, strict=True):
                ids = getattr(r, field_name)[layer]
                missing = len(seq) - ids.shape[0]
                rows += [ids, ids.new_full((missing, ids.shape[1]), -1)] if missing > 0 else [ids[: len(seq)]]
            store[layer] = torch.cat(rows)
    return trace


def completion_logprobs(
    model: Transformer,
    batch: CompletionBatch,
    *,
    replay: bool = False,
    indexer_loss: bool = False,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Logprob of every completion token under ``model`` (one tensor per sequence), differentiable.

    Computed with :func:`dsv4.core.numerics.token_logprobs`, the same function the engine uses for
    the behaviour logprobs, in the model's numerics mode: with batch-invariant numerics on both sides
    the two agree bit for bit. ``replay`` imposes the recorded expert / indexer choices.
    """
    device = model.embed.weight.device
    fb = ForwardBatch.from_requests(batch.sequences, sample="all", device=device)
    out = model.run(fb, routing=_replay(batch) if replay else None, indexer_loss=indexer_loss)
    rows, targets = [], []
    for start, seq, p in zip(fb.starts.tolist(), batch.sequences, batch.prompt_lens, strict=True):
        rows.append(torch.arange(start + p - 1, start + len(seq) - 1))
        targets.append(torch.tensor(seq[p:]))
    idx = torch.cat(rows).to(device)
    lp = token_logprobs(out.logits[idx], torch.cat(targets).to(device), model.invariant)
    sizes = [len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens, strict=True)]
    return list(torch.split(lp, sizes)), out.aux_losses


def weights_checksum(model: torch.nn.Module) -> str:
    """BLAKE2b of every parameter and buffer of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
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
    # hashlib releases the GIL on large buffers: both sides are hashed at once (two cores)
    with ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(weights_checksum, dst)
        want = weights_checksum(src)
        got = theirs.result()
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
