"""Dataset-driven tasks: a jsonl file of prompts and verifier references, split and sampled by epochs.

Records. One JSON object a line (blank lines are skipped):

- exactly one of ``prompt`` (a string, the text the model continues) or ``messages`` (OpenAI-style chat
  messages, rendered with the tokenizer's chat template and a generation prompt, as ``dsv4 batch`` does;
  the last message is the one the model answers, so it must not be the assistant's);
- optionally ``response``: the completion SFT trains on (prompt ids + response ids + EOS, loss on the
  response only); ``null`` is the same as leaving it out;
- every other field is the verifier's reference data (:attr:`~dsv4.core.interfaces.VerifySample.reference`):
  ``answer`` for ``exact`` / ``numeric`` / ``math``, ``tests`` / ``assert_tests`` for ``code``, ``pattern``
  for ``regex``, whatever a plugin verifier reads.

A bad line (not JSON, not an object, no prompt, both ``prompt`` and ``messages``, a wrong type, a chat template
that fails, a prompt too long for the engine) is a :class:`ValueError` ``"<file>:<line>: <problem>"`` raised
while the file is read, before any training.

Split. Without an eval file, a record is held out for evaluation when the first 8 bytes of
``blake2b(key)``, as an integer divided by 2⁶⁴, fall below ``eval_fraction``; the key is the ``prompt`` string,
or the ``messages`` as canonical JSON (sorted keys, no spaces). So the split is a fixed property of the prompt:
the same for every seed and run, and two records with the same prompt are always on the same side, so train
and eval never share one.

Sampling: :class:`EpochSampler`, a pure function of (key, n, salt).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from dsv4.engine.tokenizer import Tokenizer
from dsv4.rl.tasks import Problem

__all__ = ["DataConfig", "Dataset", "EpochSampler", "Record", "in_eval_split", "read_records"]

_PROMPT_KEYS = ("prompt", "messages")
_RECORD_KEYS = frozenset({*_PROMPT_KEYS, "response"})  # everything else is the verifier's reference


class DataConfig(BaseModel):
    """The ``data`` section of a ``task: jsonl`` recipe (``data.<name>=…`` overrides of ``dsv4 train``)."""

    model_config = ConfigDict(extra="forbid")

    train: str  # jsonl of training records
    eval: str | None = None  # jsonl of evaluation records; None: held out of `train` by a hash of the prompt
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)  # share of prompts held out when `eval` is None
    chat: bool = False  # render `prompt` strings with the chat template too, as one user message
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # template variables, e.g. thinking: true


@dataclass(frozen=True, slots=True)
class Record:
    """One dataset line, read and tokenised."""

    problem: Problem  # prompt = the text the engine is given (a rendered chat template for messages)
    where: str  # "<file>:<line>", for error messages
    key: str  # what the split hashes: the prompt string, or the messages as canonical JSON
    prompt_tokens: int
    sft_tokens: int | None  # prompt + response + EOS; None without a response


def read_records(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    chat: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Every record of the jsonl file ``path``, in file order; a bad line raises ``"<file>:<line>: …"``."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    kwargs = dict(chat_template_kwargs or {})
    records = []
    with source.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{source}:{number}"
            try:
                records.append(_record(raw, where, tokenizer, chat, kwargs))
            except ValueError as e:  # UnicodeDecodeError and the chat template's errors included
                raise ValueError(f"{where}: {e}") from None
    return records


def _record(raw: bytes, where: str, tokenizer: Tokenizer, chat: bool, kwargs: dict[str, Any]) -> Record:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a record must be a JSON object, got {_kind(data)}")
    given = [k for k in _PROMPT_KEYS if k in data]
    if not given:
        raise ValueError("no prompt: a record needs 'prompt' (a string) or 'messages' (a list of chat messages)")
    if len(given) > 1:
        raise ValueError("both 'prompt' and 'messages': a record gives exactly one of them")
    response = data.get("response")
    if response is not None and not isinstance(response, str):
        raise ValueError(f"'response' must be a string, got {_kind(response)}")
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {_kind(prompt)}")
        if not prompt:
            raise ValueError("'prompt' is empty")
        key = prompt
        text = _render(tokenizer, [{"role": "user", "content": prompt}], kwargs) if chat else prompt
    else:
        messages = data["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"'messages' must be a list of chat messages, got {_kind(messages)}")
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            raise ValueError("'messages' ends with an assistant message; the model answers the last message "
                             "(put the reply to train on in 'response')")
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        text = _render(tokenizer, messages, kwargs)
    reference = {k: v for k, v in data.items() if k not in _RECORD_KEYS}
    prompt_tokens = len(tokenizer.encode(text))
    sft_tokens = None
    if response is not None:
        sft_tokens = prompt_tokens + len(tokenizer.encode(response, add_special_tokens=False)) + 1
    return Record(Problem(text, reference=reference, response=response), where, key, prompt_tokens, sft_tokens)


def _render(tokenizer: Tokenizer, messages: list[Any], kwargs: dict[str, Any]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except ValueError as e:
        raise ValueError(f"'messages': {e}") from None


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def in_eval_split(key: str, fraction: float) -> bool:
    """Whether the record with split key ``key`` is held out for evaluation (see the module docstring)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass(frozen=True)
class Dataset:
    """A jsonl task's records: ``train`` and ``eval``, each in file order."""

    train: list[Record]
    eval: list[Record]

    @classmethod
    def load(cls, config: DataConfig, tokenizer: Tokenizer) -> Dataset:
        """Read ``config.train`` (and ``config.eval``) and split; errors name the file and line, or the option."""
        def read(path: str) -> list[Record]:
            return read_records(path, tokenizer, chat=config.chat, chat_template_kwargs=config.chat_template_kwargs)

        train = read(config.train)
        if not train:
            raise ValueError(f"data.train: {config.train} has no records")
        if config.eval is not None:
            held = read(config.eval)
            if not held:
                raise ValueError(f"data.eval: {config.eval} has no records")
            shared = {r.key for r in train} & {r.key for r in held}
            if shared:
                logger.warning("{} prompts of data.eval ({}) are in data.train too", len(shared), config.eval)
            return cls(train, held)
        out = [in_eval_split(r.key, config.eval_fraction) for r in train]
        kept, held = [r for r, o in zip(train, out) if not o], [r for r, o in zip(train, out) if o]
        for side, records in (("eval", held), ("train", kept)):
            if not records:
                raise ValueError(f"data.eval_fraction={config.eval_fraction} leaves no {side} record among the "
                                 f"{len(train)} of {config.train}; change data.eval_fraction or give data.eval")
        return cls(kept, held)

    def check_lengths(self, max_model_len: int, *, sft: bool) -> None:
        """Every prompt leaves the engine room for a token; with ``sft``, every training sequence (prompt +
        response + EOS) fits ``max_model_len`` (it is what the model will generate into)."""
        for r in (*self.train, *self.eval):
            if r.prompt_tokens >= max_model_len:
                raise ValueError(f"{r.where}: the prompt is {r.prompt_tokens} tokens; engine.max_model_len="
                                 f"{max_model_len} must leave room for at least one generated token")
        for r in self.train if sft else ():
            if r.sft_tokens is not None and r.sft_tokens > max_model_len:
                raise ValueError(f"{r.where}: prompt + response + EOS is {r.sft_tokens} tokens, more than "
                                 f"engine.max_model_len={max_model_len}")


class EpochSampler:
    """Batches of ``problems`` from seeded per-epoch permutations; a pure function of (key, n, salt).

    The stream is epoch 0's order, then epoch 1's, …: epoch ``e`` is a permutation of the problems by
    ``random.Random(f"{key}:{e}").shuffle``. Batch ``salt`` of size ``n`` is the stream's positions
    ``salt·n … salt·n + n − 1``. So a caller that asks for batches 0, 1, 2, … of one size (SFT asks for batch
    ``step``) sees every problem exactly once per epoch, in a fresh order each epoch, and any batch can be
    computed alone, without the ones before it, which is what resume relies on. A batch that straddles two
    epochs may hold a problem twice (once from each); ``n`` larger than the dataset repeats problems.
    """

    def __init__(self, problems: Sequence[Problem], key: str) -> None:
        if not problems:
            raise ValueError("EpochSampler: no problems to sample from")
        self.problems, self.key = tuple(problems), key

    def __call__(self, n: int, salt: int) -> list[Problem]:
        size = len(self.problems)
        out = []
        for position in range(salt * n, (salt + 1) * n):
            epoch, index = divmod(position, size)
            out.append(self.problems[_permutation(self.key, epoch, size)[index]])
        return out


@lru_cache(maxsize=16)  # a cache of a pure function: batches mostly fall within one or two epochs
def _permutation(key: str, epoch: int, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"{key}:{epoch}").shuffle(order)
    return tuple(order)
