"""The offline batch runner: a jsonl file of requests → the engine → a jsonl file of results.

``dsv4 batch --model DIR --input in.jsonl --output out.jsonl [key=value ...]`` on the command line,
:func:`run_batch` from Python. The line and record formats are documented in the README (``dsv4 batch``).

Resumable by construction: each record is appended as one whole line in a single write, a cut-off last
line left by a killed run is removed, and input ids that already have a record are skipped. At most
``max_inflight`` requests are inside the engine at once, so the input is streamed, never loaded whole.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from io import FileIO
from pathlib import Path
from typing import Any

from pydantic import Field
from tqdm import tqdm

from dsv4.core.config import ConfigError
from dsv4.core.runconfig import RunConfigModel
from dsv4.engine.engine import Engine, EngineConfig, Prompt
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.tokenizer import Tokenizer

__all__ = ["BatchConfig", "run_batch"]

_PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")
_LINE_KEYS = frozenset({"id", "sampling_params", *_PROMPT_KEYS})


class BatchConfig(RunConfigModel):
    """Options of ``dsv4 batch``: YAML keys and ``key=value`` overrides (``engine.max_num_seqs=8``)."""

    model: str | None = None  # checkpoint directory; wins over engine.model
    input: str | None = None  # jsonl of requests, one JSON object a line
    output: str | None = None  # jsonl of results; when it exists, the run resumes it
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)  # what a line's sampling_params override
    max_inflight: int | None = Field(default=None, ge=1)  # requests inside the engine; default 4 × max_num_seqs
    chat: bool = False  # render `prompt` strings with the chat template, as one user message
    retry_errors: bool = False  # redo the ids whose record is an error (they are removed from the output)
    fsync_every: int = Field(default=64, ge=1)  # records between fsyncs of the output (and one at the end)


def run_batch(config: BatchConfig, *, engine: Engine | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every input line that has no record in the output yet; return the summary (also printed).

    The summary: ``done``, ``errors`` (records written this run), ``skipped`` (lines an earlier run
    finished), ``prompt_tokens``, ``generated_tokens``, ``elapsed_s``, ``generated_tok_s``, ``requests_s``.
    ``engine`` reuses a loaded engine (its own options apply, not ``config.engine``); otherwise one is built
    only when there is work. On Ctrl-C the requests in flight are aborted, every record written is whole,
    and the KeyboardInterrupt propagates; a rerun resumes.
    """
    if config.input is None or config.output is None:
        raise ConfigError("batch: both input and output are needed (--input/--output, or input=/output=)")
    source = Path(config.input)
    if not source.is_file():
        raise ConfigError(f"input: {source}: no such file")
    out = _Output(Path(config.output), retry_errors=config.retry_errors, fsync_every=config.fsync_every)
    todo = skipped = 0
    for line in _todo(source, out):  # a first pass over ids only: the total for the bar, and maybe no work
        todo, skipped = todo + (line is not None), skipped + (line is None)
    if todo == 0:
        retry = f" ({out.errors} of them errors: --retry-errors redoes those)" if out.errors else ""
        held = f"all {skipped} ids of {source} are already in {out.path}{retry}" if skipped else f"{source} is empty"
        _say(f"batch: nothing to do: {held}")
        return _Tally(skipped=skipped).summary()

    if engine is None:
        engine = _build_engine(config)
    limit = config.max_inflight or 4 * engine.config.max_num_seqs
    lines = (line for line in _todo(source, out) if line is not None)
    active: dict[str, _Line] = {}  # engine request id -> its input line
    tally = _Tally(skipped=skipped)
    bar = tqdm(total=todo, desc="batch", unit="req", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def emit(record: dict[str, Any]) -> None:
        out.write(record)
        tally.add(record)
        bar.update(1)
        bar.set_postfix_str(f"{tally.summary()['generated_tok_s']:.1f} tok/s", refresh=False)

    try:
        while True:
            while len(active) < limit and (line := next(lines, None)) is not None:
                rid = f"batch-{line.number}"
                error = line.error or _add(engine, rid, line, config)
                if error is None:
                    active[rid] = line
                else:
                    emit(line.error_record(error))
            if not active:
                break
            for result in engine.step():
                if result.finished and (finished := active.pop(result.request_id, None)) is not None:
                    emit(_record(finished, result))
    except KeyboardInterrupt:
        bar.close()
        _say(f"batch: interrupted with {tally.done + tally.errors} of {todo} lines written to {out.path} "
             f"({skipped} more were done before); rerun the same command to resume")
        raise
    finally:
        for rid in active:  # a caller's engine is left with nothing of ours running
            engine.abort(rid)
        bar.close()
        out.close()
    _say(f"batch: {tally} -> {out.path}")
    return tally.summary()


# --------------------------------------------------------------------------------------------------
# Input lines
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Line:
    """One non-blank input line."""

    number: int  # 1-based line number
    id: str | int  # the line's own, or "line-<number>"
    data: Mapping[str, Any]
    error: str | None = None  # why the line cannot run, known from reading it
    duplicate_of: int | None = None  # the earlier line with the same id

    def error_record(self, message: str) -> dict[str, Any]:
        """The output record saying why this line produced no result."""
        record: dict[str, Any] = {"id": self.id, "error": message}
        if self.duplicate_of is not None:  # its id belongs to the other line: resume knows it by line
            record |= {"line": self.number, "duplicate_of": self.duplicate_of}
        return record


def _read(path: Path) -> Iterator[_Line]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            default = f"line-{number}"
            try:
                data = json.loads(raw)
            except ValueError as e:  # UnicodeDecodeError included
                yield _Line(number, default, {}, f"line {number} is not valid JSON ({e})")
                continue
            if not isinstance(data, dict):
                yield _Line(number, default, {}, f"line {number} must be a JSON object, got {type(data).__name__}")
                continue
            rid = data.get("id", default)
            if isinstance(rid, bool) or not isinstance(rid, str | int):
                yield _Line(number, default, {}, f"line {number}: id must be a string or an integer, got {rid!r}")
                continue
            yield _Line(number, rid, data)


def _todo(path: Path, out: _Output) -> Iterator[_Line | None]:
    """The input's lines in order, None for each one the output already has a record of."""
    first: dict[str, int] = {}  # id -> the line that owns it
    for line in _read(path):
        key = str(line.id)
        if key not in first:
            first[key] = line.number
            yield None if key in out.done else line
        elif line.number in out.duplicates:
            yield None
        else:
            owner = first[key]
            yield replace(line, error=f"duplicate id {line.id!r}: line {owner} has it too; ids must be unique",
                          duplicate_of=owner)


def _add(engine: Engine, rid: str, line: _Line, config: BatchConfig) -> str | None:
    """Queue ``line`` in the engine; the reason when it can't be (the engine left untouched)."""
    try:
        prompt, params = _request(line.data, config, engine.tokenizer)
        engine.add_request(prompt, params, request_id=rid)
    except ValueError as e:
        return str(e)
    return None


def _request(
    data: Mapping[str, Any], config: BatchConfig, tokenizer: Tokenizer | None
) -> tuple[Prompt, SamplingParams]:
    """The prompt and sampling parameters of an input line; ``ValueError`` says what is wrong with it."""
    unknown = sorted(set(data) - _LINE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; a line takes id, one of "
                         f"{', '.join(_PROMPT_KEYS)}, and sampling_params")
    given = [k for k in _PROMPT_KEYS if k in data]
    if len(given) != 1:
        has = " and ".join(given) or "none"
        raise ValueError(f"a line needs exactly one of {', '.join(_PROMPT_KEYS)}; it has {has}")
    overrides = data.get("sampling_params", {})
    if not isinstance(overrides, dict):
        raise ValueError(f"sampling_params must be a JSON object, got {overrides!r}")
    params = SamplingParams(**{**config.sampling.model_dump(), **overrides})
    kind, value = given[0], data[given[0]]
    if kind == "prompt_token_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError("prompt_token_ids must be a list of integers")
        return value, params
    if kind == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"prompt must be a string, got {type(value).__name__}")
        if not config.chat:
            return value, params
        value = [{"role": "user", "content": value}]
    if tokenizer is None:
        raise ValueError(f"{kind} needs the chat template, but the model has no tokenizer.json: give prompt_token_ids")
    return tokenizer.apply_chat_template(value, add_generation_prompt=True), params


def _build_engine(config: BatchConfig) -> Engine:
    model = config.model or config.engine.model
    if model is None:
        raise ConfigError("batch: no model; give --model DIR (or model=DIR)")
    return Engine(config=config.engine.model_copy(update={"model": model}))


# --------------------------------------------------------------------------------------------------
# Output records
# --------------------------------------------------------------------------------------------------
def _record(line: _Line, result: RequestOutput) -> dict[str, Any]:
    """The output record of a finished request."""
    completions = []
    for c in result.outputs:
        item: dict[str, Any] = {"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if c.logprobs is not None:  # JSON object keys are strings
            item["logprobs"] = [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
        completions.append(item)
    record: dict[str, Any] = {"id": line.id}
    if result.prompt is not None:
        record["prompt"] = result.prompt
    n_prompt = len(result.prompt_token_ids)
    n_out = sum(len(c.token_ids) for c in result.outputs)
    cached = result.metrics.cached_tokens if result.metrics is not None else 0
    usage: dict[str, Any] = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                             "prompt_tokens_details": {"cached_tokens": cached}}
    accept = result.metrics.spec_accept_length if result.metrics is not None else None
    if accept is not None:
        usage["spec_accept_length"] = accept
    return record | {"num_prompt_tokens": n_prompt, "outputs": completions, "usage": usage}


def _dumps(record: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate (e.g. echoed from the input): escaped, it is valid JSON
        return json.dumps(record).encode()


def _loads(raw: bytes) -> dict[str, Any] | None:
    """A record from a complete output line, else None."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "id" in record else None


class _Output:
    """The output jsonl: what earlier runs finished, and appends that an interruption cannot cut."""

    def __init__(self, path: Path, *, retry_errors: bool, fsync_every: int) -> None:
        self.path = path
        self.done: set[str] = set()  # ids with a record
        self.duplicates: set[int] = set()  # input lines with a duplicate-id record
        self.errors = 0  # error records among them
        self._fsync_every = fsync_every
        self._unsynced = 0
        self._file: FileIO | None = None  # raw (unbuffered), opened at the first write
        if path.exists():
            self._resume(retry_errors)

    def _resume(self, retry_errors: bool) -> None:
        end = 0  # bytes of whole records
        retried = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                record = _loads(raw)
                if record is None:
                    if f.read(1):  # only the last line can be a write cut short
                        raise ConfigError(f"{self.path}: line {number} is not a JSON record and not the last line, "
                                          "so not a cut-off write; fix or remove it")
                    break
                end += len(raw)
                if "error" in record and retry_errors:
                    retried += 1
                elif "duplicate_of" in record:
                    self.duplicates.add(record.get("line", -1))
                else:
                    self.done.add(str(record["id"]))
                    self.errors += "error" in record
        if end < self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(end)
            _say(f"batch: removed a cut-off last line from {self.path}")
        if retried:
            self._drop_errors()
            _say(f"batch: retrying {retried} ids whose records were errors")

    def _drop_errors(self) -> None:
        # Rewritten beside and renamed over, so an interruption leaves either the old file or the new one.
        tmp = self.path.with_name(self.path.name + ".retry-tmp")
        with self.path.open("rb") as src, tmp.open("wb") as dst:
            for raw in src:
                record = _loads(raw)
                if record is not None and "error" not in record:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line, in one unbuffered write: a signal never lands inside it."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        view = memoryview(_dumps(record) + b"\n")
        while view:  # a raw write may be short (disk nearly full); the rest follows at once
            view = view[self._file.write(view):]
        self._unsynced += 1
        if self._unsynced >= self._fsync_every:
            self._sync()

    def _sync(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._unsynced = 0

    def close(self) -> None:
        """Fsync and close (again: a no-op)."""
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    """What this run wrote, for the progress bar and the summary."""

    skipped: int
    done: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    start: float = field(default_factory=time.monotonic)

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one written record."""
        if "error" in record:
            self.errors += 1
            return
        self.done += 1
        self.prompt_tokens += record["usage"]["prompt_tokens"]
        self.generated_tokens += record["usage"]["completion_tokens"]

    def summary(self) -> dict[str, Any]:
        """The counts, elapsed seconds and rates."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return {"done": self.done, "errors": self.errors, "skipped": self.skipped,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "elapsed_s": elapsed, "generated_tok_s": self.generated_tokens / elapsed,
                "requests_s": self.done / elapsed}

    def __str__(self) -> str:
        s = self.summary()
        return (f"{s['done']} done, {s['errors']} errors, {s['skipped']} skipped; {s['prompt_tokens']} prompt + "
                f"{s['generated_tokens']} generated tokens in {s['elapsed_s']:.1f} s "
                f"({s['generated_tok_s']:.1f} generated tok/s, {s['requests_s']:.2f} requests/s)")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
