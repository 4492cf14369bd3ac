"""The ragged batch one model step sees, flat over tokens (no padding to the longest request)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.core.device import to_device

__all__ = ["ForwardBatch", "common_prefix"]


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """R requests contributing T new tokens in total.

    Request ``r`` owns rows ``starts[r] : starts[r] + extend_lens[r]`` of every per-token tensor; its
    new tokens sit at absolute positions ``prefix_lens[r] …`` (``prefix_lens[r]`` tokens are already
    in the KV cache). Full-sequence training is the case ``prefix_lens == 0``.

    Without a KV pool, a request may instead find its prefix in the batch itself: ``parents[r] = q``
    (an earlier request, at least that long) says that request ``r``'s first ``prefix_lens[r]`` tokens
    are ``q``'s sequence (its own prefix, from its parent, then its new tokens), so ``r``'s tokens attend
    to those rows of this very forward and gradients flow into them. That is how a group of completions
    of one prompt trains with the prompt computed once, and prompts with a common start (a system prompt)
    share that too (``parents[r] = -1``: no parent).
    """

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, absolute position of each new token in its request
    req_index: torch.Tensor  # [T] long, which request each token belongs to
    starts: torch.Tensor  # [R] long
    extend_lens: torch.Tensor  # [R] long
    prefix_lens: torch.Tensor  # [R] long
    # Host copies: plans are built without device syncs.
    extend_lens_host: tuple[int, ...]
    prefix_lens_host: tuple[int, ...]
    # Rows that produce logits (None: every row). E.g. the last new token of each request.
    sample_index: torch.Tensor | None = None
    # Pool ids of the requests (paged inference); None when the batch holds whole sequences.
    rids: tuple[int, ...] | None = None
    # In-batch prefix owners (no pool): request index per request, -1 for none; None: no request has one.
    parents: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        """T, the number of new tokens in the step."""
        return int(self.input_ids.shape[0])

    @property
    def num_requests(self) -> int:
        """R, the number of requests in the step."""
        return len(self.extend_lens_host)

    @property
    def starts_host(self) -> tuple[int, ...]:
        """First row of every request (``starts`` on the host: no device read)."""
        return tuple(itertools.accumulate(self.extend_lens_host, initial=0))[:-1]

    @property
    def seq_lens_host(self) -> tuple[int, ...]:
        """Context length of every request after this step."""
        return tuple(p + e for p, e in zip(self.prefix_lens_host, self.extend_lens_host, strict=True))

    @classmethod
    def from_requests(
        cls,
        new_tokens: Sequence[Sequence[int] | torch.Tensor],
        prefix_lens: Sequence[int] | None = None,
        *,
        rids: Sequence[int] | None = None,
        sample: str | Sequence[int] = "last",
        device: torch.device | str = "cpu",
        parents: Sequence[int] | None = None,
        sample_rows: Sequence[int] | None = None,
    ) -> ForwardBatch:
        """Build a batch from each request's new token ids.

        ``sample`` chooses the rows that produce logits: ``"last"`` (the last new token of every
        request), ``"all"`` (every row: training, prompt logprobs), or a list of request indices
        whose last new token is sampled (requests still mid-prefill produce none); with such a list,
        ``sample_rows[j]`` last rows of request ``sample[j]`` (default 1: a speculative step verifies
        its drafts on several), in order. ``parents``: see the class docstring (no ``rids`` then: a
        paged request's prefix lives in the pool).
        """
        if isinstance(sample, str) and sample not in ("last", "all"):
            raise ValueError(f"sample must be 'last', 'all' or request indices, got {sample!r}")
        ext = [len(t) for t in new_tokens]
        if any(e <= 0 for e in ext):
            raise ValueError("every request in a batch needs at least one new token")
        pre = list(prefix_lens) if prefix_lens is not None else [0] * len(ext)
        if len(pre) != len(ext):
            raise ValueError(f"{len(pre)} prefix lengths for {len(ext)} requests")
        if rids is not None and len(rids) != len(ext):
            raise ValueError(f"{len(rids)} request ids for {len(ext)} requests")
        par = tuple(int(q) for q in parents) if parents is not None else None
        if par is not None:
            _check_parents(par, pre, ext, paged=rids is not None)
        dev = torch.device(device)
        picks = [] if isinstance(sample, str) else [int(i) for i in sample]
        tensors = [t for t in new_tokens if isinstance(t, torch.Tensor)]
        flat: list[int] = []
        if len(tensors) != len(new_tokens):  # token-id lists (the engine's steps): one tensor, not one per request
            flat = [i for t in new_tokens for i in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]
        # Every host list crosses to the device in one transfer (pinned, asynchronous on CUDA).
        host = torch.tensor(flat + ext + pre + picks, dtype=torch.long)
        ids, ext_t, pre_t, pick_t = torch.split(to_device(host, dev), [len(flat), len(ext), len(pre), len(picks)])
        if not flat:
            ids = torch.cat([t.to(torch.long).reshape(-1) for t in tensors]).to(dev)
        starts = torch.cumsum(ext_t, 0) - ext_t
        # output_size: the length is known here; without it CUDA reads ext_t back (a host sync)
        req_index = torch.repeat_interleave(torch.arange(len(ext), device=dev), ext_t, output_size=sum(ext))
        positions = torch.arange(ids.shape[0], device=dev) - starts[req_index] + pre_t[req_index]
        last = starts + ext_t - 1
        if isinstance(sample, str):
            sample_index = None if sample == "all" else last
        elif sample_rows is None or all(k == 1 for k in sample_rows):
            sample_index = last[pick_t]
        else:
            if len(sample_rows) != len(picks) or any(not 1 <= k <= ext[i] for i, k in zip(picks, sample_rows)):
                raise ValueError(f"sample_rows {list(sample_rows)} must give 1 … extend_len rows for each of {picks}")
            ends = list(itertools.accumulate(ext))  # host-side: no device read
            rows = [ends[i] - k + m for i, k in zip(picks, sample_rows, strict=True) for m in range(k)]
            sample_index = to_device(torch.tensor(rows, dtype=torch.long), dev)
        return cls(
            input_ids=ids,
            positions=positions,
            req_index=req_index,
            starts=starts,
            extend_lens=ext_t,
            prefix_lens=pre_t,
            extend_lens_host=tuple(ext),
            prefix_lens_host=tuple(pre),
            sample_index=sample_index,
            rids=tuple(rids) if rids is not None else None,
            parents=par if par is not None and any(q >= 0 for q in par) else None,
        )

    @classmethod
    def dense(cls, input_ids: torch.Tensor) -> ForwardBatch:
        """Every row of ``input_ids [B, S]`` is one whole sequence; logits for every position."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        return cls.from_requests(list(input_ids), sample="all", device=input_ids.device)


def _check_parents(parents: tuple[int, ...], prefix_lens: list[int], extend_lens: list[int], *, paged: bool) -> None:
    """Every parent is an earlier request of this batch, long enough for the prefix it lends."""
    if len(parents) != len(extend_lens):
        raise ValueError(f"{len(parents)} parents for {len(extend_lens)} requests")
    if paged and any(q >= 0 for q in parents):
        raise ValueError("parents describe prefixes computed in the same forward; a paged batch's are in the pool")
    for r, q in enumerate(parents):
        if q < 0:
            continue
        if q >= r:
            raise ValueError(f"request {r}: parent {q} is not an earlier request of the batch")
        if not 0 < prefix_lens[r] <= prefix_lens[q] + extend_lens[q]:
            raise ValueError(f"request {r}: a prefix of {prefix_lens[r]} tokens from parent {q}, "
                             f"which has {prefix_lens[q] + extend_lens[q]}")


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the token sequences (the part a batch can compute once)."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for j in range(n):
        if any(s[j] != first[j] for s in sequences):
            return j
    return n
