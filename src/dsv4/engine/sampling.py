"""From logits to tokens: vLLM-compatible sampling parameters and a batched, seed-stable sampler.

- :class:`SamplingParams` — what a request asks for, with vLLM's names and defaults.
- :class:`SequenceSampling` — one generated sequence's random stream and penalty bookkeeping.
- :class:`Sampler` — one call per engine step over every sequence that needs a token.

The processing order is vLLM's: grammar mask → penalties → temperature → top-k → top-p → min-p → draw. Tensor work is
vectorised over rows; only the random draw loops over rows, so that each row draws from its own
generator and **a seed gives the same tokens whatever else shares the batch**.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from torch import Tensor

from dsv4.engine.grammar import StructuredOutputs
from dsv4.engine.outputs import Logprob

__all__ = ["MAX_LOGPROBS", "MAX_N", "SampleResult", "Sampler", "SamplingParams", "SequenceSampling", "sequence_seed"]

MAX_N = 64  # sequences per request
MAX_LOGPROBS = 20  # alternatives per token besides the chosen one
_SEED_MOD = 2**63  # torch.Generator.manual_seed takes any int64; stay non-negative


def _show(v: Any) -> str:
    # "-1" rather than "-1.0": the user most likely typed an int
    return f"{v:g}" if isinstance(v, float) else repr(v)


# field -> (allowed?, how to say what is allowed); one place for the ranges and their messages
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: 1 <= v <= MAX_N, f"between 1 and {MAX_N}"),
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "min_tokens": (lambda v: v >= 0, ">= 0"),
    # Bounded so that logits / temperature and the penalties stay finite in float32.
    "temperature": (lambda v: 0 <= v <= 1e4, "in [0, 1e4]"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= -1, "-1 or 0 (off) or >= 1"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: 1e-4 <= v <= 1e4, "in [1e-4, 1e4]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "logprobs": (lambda v: v is None or 0 <= v <= MAX_LOGPROBS, f"None or between 0 and {MAX_LOGPROBS}"),
}


class SamplingParams(BaseModel):
    """How to sample one request; names, meanings and defaults follow vLLM's ``SamplingParams``.

    Invalid values raise ``ValueError`` naming the field and its allowed range.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    n: int = 1  # sequences generated for the prompt
    max_tokens: int = 16  # generated tokens at most
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # tokens seen in prompt or output: logit / p if > 0 else logit * p
    frequency_penalty: float = 0.0  # subtract count_in_output * f
    presence_penalty: float = 0.0  # subtract p from every token present in the output
    seed: int | None = None  # None: a fresh random seed per sequence
    stop: list[str] = Field(default_factory=list)  # stop strings; the output ends before them
    stop_token_ids: list[int] = Field(default_factory=list)  # tokens that end the output (kept in it)
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # constrain the text: a JSON schema, a regex, ...

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ValueError(_format_errors(e)) from None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: Any) -> Any:
        # vLLM accepts stop="###" as well as a list
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator(*_RANGES, mode="after")
    @classmethod
    def _in_range(cls, v: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        ok, allowed = _RANGES[name]
        if not ok(v):
            raise ValueError(f"{name} must be {allowed}, got {_show(v)}")
        return v

    @field_validator("stop", mode="after")
    @classmethod
    def _nonempty_stops(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError(f"stop strings must be non-empty, got {v!r}")
        return v

    @field_validator("stop_token_ids", mode="after")
    @classmethod
    def _token_ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be >= 0, got {v!r}")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.min_tokens and self.structured_outputs is not None:
            # the grammar may allow nothing but EOS before min_tokens: no token would be left to draw
            raise ValueError("min_tokens cannot be combined with structured_outputs")
        return self

    @property
    def greedy(self) -> bool:
        """Whether the token is the argmax (no randomness is consumed)."""
        # Below 1e-5 a temperature is greedy in all but float noise (vLLM's rule), and dividing by it
        # would overflow float32.
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """Whether any repetition / frequency / presence penalty is active."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        if e["type"] == "value_error":  # ours: the message already names the field
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            loc = ".".join(str(p) for p in e["loc"])
            parts.append(f"{loc}: {e['msg']}, got {e['input']!r}")
    return "invalid SamplingParams: " + "; ".join(parts)


def sequence_seed(seed: int, index: int) -> int:
    """The generator seed of sequence ``index`` of a request seeded with ``seed``.

    Sequence 0 uses the seed itself, so ``n=1`` and the first of ``n>1`` sequences agree.
    """
    return (seed if index == 0 else seed * 1_000_003 + index) % _SEED_MOD


class SequenceSampling:
    """Sampling state of one generated sequence: parameters, random stream and token history.

    The engine calls :meth:`append` with every token it keeps; the sampler never appends by itself
    (a verifier may reject sampled tokens).
    """

    __slots__ = (
        "_counts", "_offset", "_rep_scale", "generator", "index", "output_token_ids", "params", "prompt_token_ids",
        "seed",
    )  # fmt: skip

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int] = (), *, index: int = 0) -> None:
        self.params = params
        self.index = index
        self.seed = sequence_seed(params.seed, index) if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # Penalty state, built on first use (the vocabulary size comes with the logits) and then kept
        # current token by token, so a step neither rescans the history nor recomputes the penalties:
        # it stacks these rows and applies them in two tensor ops.
        self._rep_scale: Tensor | None = None  # [V]: repetition_penalty where seen in prompt/output, else 1
        self._offset: Tensor | None = None  # [V]: frequency * count + presence * (count > 0)
        self._counts: dict[int, int] = {}  # output counts, kept while _offset exists

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_token_ids: Sequence[int] = ()) -> list[SequenceSampling]:
        """The ``params.n`` sequences of one request."""
        return [cls(params, prompt_token_ids, index=j) for j in range(params.n)]

    def append(self, token: int) -> None:
        """Record a generated token."""
        self.output_token_ids.append(token)
        if self._rep_scale is not None:
            self._rep_scale[token] = self.params.repetition_penalty
        if self._offset is not None:
            self._bump(token)

    def _bump(self, token: int) -> None:
        assert self._offset is not None
        c = self._counts[token] = self._counts.get(token, 0) + 1
        self._offset[token] = self.params.frequency_penalty * c + self.params.presence_penalty

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    def penalty_tensors(self, vocab_size: int) -> tuple[Tensor | None, Tensor | None]:
        """``(repetition scale [V], additive offset [V])``, each None when its penalties are off.

        The penalised logits are ``where(l > 0, l / scale, l * scale) - offset`` (vLLM's order).
        """
        p = self.params
        if p.repetition_penalty != 1.0 and (self._rep_scale is None or self._rep_scale.numel() != vocab_size):
            self._rep_scale = torch.ones(vocab_size)
            seen = torch.tensor(self.prompt_token_ids + self.output_token_ids, dtype=torch.long)
            self._rep_scale[seen] = p.repetition_penalty
        if (p.frequency_penalty or p.presence_penalty) and (self._offset is None or self._offset.numel() != vocab_size):
            self._offset, self._counts = torch.zeros(vocab_size), {}
            for t in self.output_token_ids:
                self._bump(t)
        return self._rep_scale, self._offset


@dataclass(slots=True)
class SampleResult:
    """One token per row, with raw (pre-grammar-mask, pre-penalty, pre-temperature) log-probabilities: a
    constrained row's logprobs are the model's own, as vLLM's default ``raw_logprobs`` gives them."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob] | None]  # chosen + top-``params.logprobs``; None when not asked
    # Raw logprob of the chosen token for rows that asked for logprobs, or every row when the sampler
    # was built with ``token_logprobs=True`` (the RL trainer needs the behaviour policy's); else nan.
    chosen_logprob: list[float]


class Sampler:
    """Batched sampling over ``[N, V]`` float32 logits, one :class:`SequenceSampling` per row."""

    def __init__(self, eos_token_ids: Iterable[int] = (), *, token_logprobs: bool = False) -> None:
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        # A logsumexp over the vocabulary per row is a real cost per decode step: only when asked.
        self.token_logprobs = token_logprobs

    @torch.no_grad()
    def sample(
        self, logits: Tensor, seqs: Sequence[SequenceSampling], *, mask: Callable[[Tensor], None] | None = None
    ) -> SampleResult:
        """Pick one token per row of ``logits`` ``[N, V]``; row ``i`` follows ``seqs[i]``.

        ``mask``: sets the logits of tokens a row may not take to ``-inf``, in place, on a copy of ``logits``
        (structured output's grammar masks; see :meth:`dsv4.engine.grammar.Grammars.mask`).
        """
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [len(seqs)={len(seqs)}, V], got {list(logits.shape)}")
        logits = logits.float()
        n = len(seqs)
        if n == 0:
            return SampleResult([], [], [])
        params = [s.params for s in seqs]
        work = self.penalized_logits(logits, seqs, mask=mask)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        # max().indices: the first maximum like argmax, and several times faster on CPU
        if not sampled:
            tokens = work.max(dim=-1).indices
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            greedy = [i for i, p in enumerate(params) if p.greedy]
            if greedy:
                tokens[torch.tensor(greedy, device=logits.device)] = _gather(work, greedy).max(dim=-1).indices
            tokens[torch.tensor(sampled, device=logits.device)] = _draw(_gather(work, sampled),
                                                                        [seqs[i] for i in sampled])
        return _with_logprobs(logits, tokens, params, everyone=self.token_logprobs)

    def penalized_logits(
        self, logits: Tensor, seqs: Sequence[SequenceSampling], *, mask: Callable[[Tensor], None] | None = None
    ) -> Tensor:
        """``logits`` ``[N, V]`` after the grammar ``mask``, penalties and min_tokens masks: what greedy rows take
        the argmax of.

        Returns ``logits`` itself (not a copy) when no row needs any.
        """
        v = logits.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.min_tokens and s.num_output_tokens < p.min_tokens:
                # like vLLM, EOS is an ordinary token under ignore_eos, so it is not masked then
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                banned_ok = [t for t in banned if t < v]
                rows += [i] * len(banned_ok)
                cols += banned_ok
        work = logits
        if mask is not None:
            work = logits.clone()
            mask(work)
        pen = [i for i, s in enumerate(seqs) if s.params.uses_penalties]
        if pen:
            dev = logits.device
            state = [seqs[i].penalty_tensors(v) for i in pen]
            scales = [(i, scale) for i, (scale, _) in zip(pen, state, strict=True) if scale is not None]
            if scales:
                rep_rows = [i for i, _ in scales]
                scale = torch.stack([t for _, t in scales]).to(dev)  # [P, V]
                sub = _gather(work, rep_rows)
                work = _replace_rows(work, logits, rep_rows, torch.where(sub > 0, sub / scale, sub * scale))
            offsets = [(i, off) for i, (_, off) in zip(pen, state, strict=True) if off is not None]
            if offsets:
                off_rows = [i for i, _ in offsets]
                offset = torch.stack([t for _, t in offsets]).to(dev)  # [P, V]
                work = _replace_rows(work, logits, off_rows, _gather(work, off_rows) - offset)
        if rows:
            work = work.clone() if work is logits else work
            work[torch.tensor(rows, device=work.device), torch.tensor(cols, device=work.device)] = -math.inf
        return work


def _gather(x: Tensor, rows: list[int]) -> Tensor:
    """``x[rows]`` for ascending distinct ``rows``; ``x`` itself (no copy) when that is every row."""
    return x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]


def _replace_rows(x: Tensor, keep: Tensor | None, rows: list[int], value: Tensor) -> Tensor:
    """``x`` with ``rows`` set to ``value`` (``value`` itself when that is every row).

    ``keep`` is the caller's tensor: copied before it would be written to.
    """
    if len(rows) == x.shape[0]:
        return value
    x = x.clone() if x is keep else x
    x[torch.tensor(rows, device=x.device)] = value
    return x


def _draw(logits: Tensor, seqs: Sequence[SequenceSampling]) -> Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row from that row's generator. ``[R, V] -> [R]``."""
    r, v = logits.shape
    dev = logits.device
    params = [s.params for s in seqs]
    x = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]  # [R, V], a new tensor

    ks = [p.top_k if 0 < p.top_k < v else 0 for p in params]
    ps = [p.top_p for p in params]
    # Top-k rows, grouped by k: one partial topk per distinct k (requests usually share one), and each
    # row is reduced over exactly its own k values, so its floats never depend on the batch.
    for k in sorted(set(ks) - {0}):
        rows = [i for i in range(r) if ks[i] == k]
        vals, order = _gather(x, rows).topk(k, dim=-1)  # [n, k], descending
        vals = _top_p_sorted(vals, vals.logsumexp(dim=-1, keepdim=True), [ps[i] for i in rows])
        x = _replace_rows(x, None, rows, torch.full((len(rows), v), -math.inf, device=dev).scatter_(1, order, vals))
    rows = [i for i in range(r) if ks[i] == 0 and ps[i] < 1]
    if rows:
        x = _replace_rows(x, None, rows, _top_p_rows(_gather(x, rows), [ps[i] for i in rows]))
    # min-p in logit space: p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); no softmax needed.
    rows = [i for i in range(r) if params[i].min_p > 0]
    if rows:
        sub = _gather(x, rows)
        log_min_p = torch.tensor([math.log(params[i].min_p) for i in rows], device=dev)[:, None]
        x = _replace_rows(x, None, rows, sub.masked_fill(sub < sub.max(dim=-1, keepdim=True).values + log_min_p,
                                                          -math.inf))

    # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p; taken as argmax(x - log q), the
    # same argmax without underflow. q = -log(u) with u ~ U[0, 1) (u = 0 gives q = inf: that token just
    # loses); uniform_ is several times faster than exponential_ on CPU. Each row's u comes from its
    # own generator, so a row's draw does not depend on the batch. Rows are filled in place: stacking
    # R separate tensors of V floats costs far more (allocator page faults) than the draws.
    pinned = dev.type == "cuda"  # drawn straight into pinned memory: one asynchronous transfer
    u = torch.empty(r, v, pin_memory=pinned)  # [R, V]
    for row, s in zip(u, seqs, strict=True):
        row.uniform_(generator=s.generator)
    u = u.to(dev, non_blocking=pinned)
    return (x - u.log_().neg_().log_()).max(dim=-1).indices


# Top-p without top-k first tries the most likely tokens only: the kept set almost always ends within
# the first thousand, and a partial topk costs a small fraction of a full sort of a 100k+ vocabulary.
_TOP_P_CANDIDATES = (1024, 16384)


def _top_p_rows(x: Tensor, ps: list[float]) -> Tensor:
    """Top-p over whole rows ``[R, V]`` (no top-k).

    Rows whose kept set ends inside the top candidates skip the full sort; which path a row takes
    depends on that row alone, and every path normalises by the whole row's logsumexp.
    """
    v = x.shape[1]
    lse = x.logsumexp(dim=-1, keepdim=True)  # [R, 1]
    out = torch.full_like(x, -math.inf)
    p = torch.tensor(ps, device=x.device)
    todo = torch.arange(x.shape[0], device=x.device)  # rows not decided yet
    for m in sorted({min(c, v) for c in _TOP_P_CANDIDATES} | {v}):
        sub = x[todo]
        if m < v:
            vals, order = sub.topk(m, dim=-1)  # [T, m], descending
            # Tokens outside the candidates have at least the candidates' mass before them: when that
            # reaches p they are all cut, and the candidates decide alone.
            done = (vals - lse[todo]).exp().sum(dim=-1) >= p[todo]
        else:
            vals, order = sub.sort(dim=-1, descending=True)
            done = torch.ones_like(todo, dtype=torch.bool)
        if bool(done.any()):
            d = todo[done]
            kept = _top_p_sorted(vals[done], lse[d], [ps[i] for i in d.tolist()])
            out[d] = out[d].scatter_(1, order[done], kept)
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return out


def _top_p_sorted(vals: Tensor, lse: Tensor, ps: list[float]) -> Tensor:
    """Mask (with -inf) the tail of descending logits ``[R, M]`` beyond each row's top-p mass.

    ``lse`` ``[R, 1]`` normalises; the kept set is the shortest prefix whose mass reaches ``p``.
    """
    if all(p >= 1 for p in ps):
        return vals
    probs = (vals - lse).exp()
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token; 0 for the first
    # top_p == 1 rows get an unreachable threshold: a rounded cumsum can touch 1.0 and must not cut
    limit = torch.tensor([p if p < 1 else math.inf for p in ps], device=vals.device)[:, None]
    return vals.masked_fill(before >= limit, -math.inf)


def _with_logprobs(
    raw: Tensor, tokens: Tensor, params: Sequence[SamplingParams], *, everyone: bool = False
) -> SampleResult:
    """Chosen and top-N log-probabilities from the raw distribution ``log_softmax(raw)``."""
    if not everyone and all(p.logprobs is None for p in params):
        return SampleResult(tokens=tokens.tolist(), logprobs=[None] * len(params), chosen_logprob=[math.nan] * len(params))
    lse = torch.logsumexp(raw, dim=-1)  # [N]
    chosen_raw = raw.gather(1, tokens[:, None])[:, 0]  # [N]
    chosen = (chosen_raw - lse).tolist()
    token_list = tokens.tolist()
    out: list[dict[int, Logprob] | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if rows:
        sub = _gather(raw, rows)
        sub_lse = _gather(lse[:, None], rows)  # [R, 1]
        # rank = 1 + tokens strictly more likely (vLLM's rule), compared on raw logits; int32 sums are
        # several times faster than the default int64 on CPU
        ranks = ((sub > _gather(chosen_raw[:, None], rows)).sum(dim=-1, dtype=torch.int32) + 1).tolist()
        kmax = max(params[i].logprobs or 0 for i in rows)
        top_lp: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if kmax > 0:
            vals, ids = sub.topk(kmax, dim=-1)
            top_lp = (vals - sub_lse).tolist()
            top_ids = ids.tolist()
        for j, i in enumerate(rows):
            d = {token_list[i]: Logprob(logprob=chosen[i], rank=ranks[j])}
            for r in range(params[i].logprobs or 0):
                d.setdefault(top_ids[j][r], Logprob(logprob=top_lp[j][r], rank=r + 1))
            out[i] = d
    return SampleResult(tokens=token_list, logprobs=out, chosen_logprob=chosen)
