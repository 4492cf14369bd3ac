"""What the engine returns, in the shape users of vLLM / SGLang already know."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput", "Routing"]


@dataclass(slots=True)
class Logprob:
    """A token's log-probability under the model (raw logits, before penalties and temperature)."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass(slots=True)
class Routing:
    """A finished sequence's recorded choices per layer, for positions 0 … len-2 (the last token was
    sampled, never fed through the model): ``experts[layer] [len-1, k]``, ``indexer[layer] [len-1, topk]``."""

    experts: dict[int, torch.Tensor]
    indexer: dict[int, torch.Tensor]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (a request with ``n > 1`` has several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # Per generated token: the chosen token and the top-N alternatives, when logprobs were asked for.
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    # Raw logprob of every generated token (EngineConfig.return_token_logprobs): the behaviour policy.
    token_logprobs: list[float] | None = None
    routing: Routing | None = None  # EngineConfig.record_routing, once finished

    @property
    def finished(self) -> bool:
        """Whether this sequence has ended."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.monotonic()``) of a request's life."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    num_preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens its first sequence resumed from the prefix cache
    # Speculative decoding, over the request's sequences: steps that verified drafts, drafts verified,
    # drafts accepted.
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_accept_length(self) -> float | None:
        """Tokens per verifying step (accepted drafts + the one the target samples); None: none ran."""
        return (self.spec_accepted_tokens + self.spec_steps) / self.spec_steps if self.spec_steps else None


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt and its completions (final, or so far when streaming)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = field(default=None)
