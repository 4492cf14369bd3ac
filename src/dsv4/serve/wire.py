"""OpenAI wire format: usage, logprobs and validation errors as OpenAI's API spells them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsv4.engine.engine import Engine
from dsv4.engine.outputs import CompletionOutput, Logprob, RequestOutput
from dsv4.serve.protocol import OpenAIError

__all__ = ["Usage", "chat_logprobs", "completion_logprobs", "validation_body"]


class Usage:
    """Token counts of a response (over its choices and, for several prompts, its requests)."""

    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion: dict[int, int] = {}
        self.spec: dict[int, tuple[int, int]] = {}  # verifying steps, accepted drafts

    def update(self, k: int, out: RequestOutput) -> None:
        self.prompt[k] = len(out.prompt_token_ids) * max(1, len(out.outputs))
        self.cached[k] = out.metrics.cached_tokens if out.metrics is not None else 0
        self.completion[k] = sum(len(c.token_ids) for c in out.outputs)
        if out.metrics is not None and out.metrics.spec_steps:
            self.spec[k] = (out.metrics.spec_steps, out.metrics.spec_accepted_tokens)

    def body(self) -> dict[str, Any]:
        """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens``: prompt tokens served by the prefix cache;
        with speculative decoding, ``spec_accept_length``: tokens per verifying step (SGLang's name)."""
        p, c = sum(self.prompt.values()), sum(self.completion.values())
        body: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}
        if self.spec:
            steps = sum(s for s, _ in self.spec.values())
            body["spec_accept_length"] = (sum(a for _, a in self.spec.values()) + steps) / steps
        return body


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token], skip_special_tokens=False) if engine.tokenizer else str(token)


def completion_logprobs(engine: Engine, c: CompletionOutput, start: int, n: int) -> dict[str, Any]:
    """``logprobs`` of a completions choice from token ``start`` on, ``n`` alternatives each."""
    entries = list(zip(c.token_ids[start:], (c.logprobs or [])[start:], strict=False))
    tokens = [_token_text(engine, t) for t, _ in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [d[t].logprob for t, d in entries],
        "top_logprobs": [_top_by_text(engine, d, n) for _, d in entries],
        "text_offset": offsets,
    }


def _top_by_text(engine: Engine, d: dict[int, Logprob], n: int) -> dict[str, float]:
    """Top ``n`` keyed by token text; tokens that decode alike (partial UTF-8) keep the likeliest's value."""
    top: dict[str, float] = {}
    for k, v in _top(d, n):
        top.setdefault(_token_text(engine, k), v.logprob)
    return top


def chat_logprobs(engine: Engine, c: CompletionOutput, start: int, n: int) -> dict[str, Any]:
    """``logprobs`` of a chat choice from token ``start`` on, ``n`` alternatives each."""
    content = []
    for t, d in zip(c.token_ids[start:], (c.logprobs or [])[start:], strict=False):
        text = _token_text(engine, t)
        content.append({
            "token": text, "logprob": d[t].logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token_text(engine, k), "logprob": v.logprob,
                              "bytes": list(_token_text(engine, k).encode())} for k, v in _top(d, n)],
        })
    return {"content": content}


def _top(d: dict[int, Logprob], n: int) -> list[tuple[int, Logprob]]:
    """The ``n`` most likely tokens (the chosen one among them only if it ranks there), by rank."""
    return sorted(((k, v) for k, v in d.items() if v.rank <= n), key=lambda kv: kv[1].rank)


def validation_body(errors: Sequence[Any]) -> dict[str, Any]:
    """An OpenAI-style 400 body for pydantic's errors: every problem named, ``param`` the first field."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        ctx = err.get("ctx") or {}
        if kind == "unencodable_text":  # a model-level check that names the field itself
            where = str(ctx.get("param", where))
            parts.append(str(err.get("msg", "text is not valid Unicode")))
        elif kind == "invalid_item" and ctx.get("subpath"):  # a list item checked against its model
            where = f"{where}.{ctx['subpath']}"
            parts.append(f"{where}: {ctx.get('problem', 'invalid')}")
        elif kind == "extra_forbidden":
            parts.append(f"Unrecognized request argument supplied: {where}")
        elif kind == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg', ''))}")
            where = "body"
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        param = param or where
    return OpenAIError("; ".join(parts) or "invalid request", param=param).body()

