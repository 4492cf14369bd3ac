"""The batch runner: CLI round trip, resume after a cut-off write, overrides, no work twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import dsv4
from dsv4 import Engine, SamplingParams
from dsv4.core.config import ModelConfig
from dsv4.core.runconfig import load_run_config
from dsv4.serve.batch import BatchConfig, run_batch
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer

VOCAB = 320
MAX_LEN = 48  # engine.max_model_len of every run here: a 60-token prompt is over it
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="session")
def batch_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch-model")
    model = random_model(ModelConfig.tiny(vocab_size=VOCAB, num_nextn_predict_layers=0), seed=7)
    dsv4.save_model(model, path)
    write_byte_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def engine(batch_model_dir: Path) -> Engine:
    return Engine(batch_model_dir, max_model_len=MAX_LEN, max_num_seqs=2)


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _config(tmp_path: Path, inp: Path, *overrides: str) -> BatchConfig:
    base = [f"input={inp}", f"output={tmp_path / 'out.jsonl'}", "sampling.temperature=0", "sampling.max_tokens=6",
            "sampling.ignore_eos=true"]
    return load_run_config(BatchConfig, None, [*base, *overrides])


def _prompt_lines(n: int) -> list[dict[str, Any]]:
    return [{"id": f"p{i}", "prompt_token_ids": [2 + i, 40, 41 + i, 7]} for i in range(n)]


def test_cli_round_trip(tmp_path: Path, batch_model_dir: Path, engine: Engine) -> None:
    messages = [{"role": "user", "content": "Count the boats."}]
    lines: list[Any] = [
        {"id": "text", "prompt": "The little robot"},
        {"id": "ids", "prompt_token_ids": [5, 6, 7, 8, 9]},
        {"id": "chat", "messages": messages},
        {"id": "short", "prompt": "The river", "sampling_params": {"max_tokens": 2}},
        {"id": "lp", "prompt": "kettle", "sampling_params": {"logprobs": 2, "max_tokens": 3}},
        "",  # blank: skipped
        {"prompt": "no id given"},  # line 7: id "line-7"
        "{not json",  # line 8
        {"id": "long", "prompt_token_ids": list(range(2, 62))},
        {"id": "badparams", "prompt": "x", "sampling_params": {"temperature": -1}},
        {"id": "none"},
    ]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    (tmp_path / "run.yaml").write_text("sampling:\n  temperature: 0\n  max_tokens: 6\n  ignore_eos: true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "batch", "--model", str(batch_model_dir), "--input", str(inp),
         "--output", str(out), "--config", str(tmp_path / "run.yaml"),
         f"engine.max_model_len={MAX_LEN}", "engine.max_num_seqs=3", "max_inflight=4"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 done, 4 errors, 0 skipped" in proc.stderr and "tok/s" in proc.stderr  # summary and progress bar

    records = {r["id"]: r for r in _records(out)}
    assert len(records) == len(_records(out))  # every id exactly once
    assert set(records) == {"text", "ids", "chat", "short", "lp", "line-7", "line-8", "long", "badparams", "none"}
    assert "not valid JSON" in records["line-8"]["error"]
    assert "max_model_len" in records["long"]["error"] and "60 tokens" in records["long"]["error"]
    assert "temperature must be in [0, 1e4]" in records["badparams"]["error"]
    assert "exactly one of prompt" in records["none"]["error"]

    # the same prompts and parameters through Engine.generate give the same tokens and text
    default = SamplingParams(**GREEDY)
    chat_prompt = engine.tokenizer.apply_chat_template(messages)  # type: ignore[union-attr]
    expected = {
        "text": ("The little robot", default), "ids": ([5, 6, 7, 8, 9], default), "chat": (chat_prompt, default),
        "short": ("The river", SamplingParams(**{**GREEDY, "max_tokens": 2})),
        "lp": ("kettle", SamplingParams(**{**GREEDY, "logprobs": 2, "max_tokens": 3})),
        "line-7": ("no id given", default),
    }
    results = engine.generate([p for p, _ in expected.values()], [s for _, s in expected.values()])
    for rid, result in zip(expected, results):
        rec, want = records[rid], result.outputs[0]
        assert rec["outputs"][0]["token_ids"] == want.token_ids and rec["outputs"][0]["text"] == want.text
        assert rec["outputs"][0]["finish_reason"] == "length"
        usage = rec["usage"]
        assert usage["prompt_tokens"] == len(result.prompt_token_ids)
        assert usage["completion_tokens"] == len(want.token_ids)
        assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert records["text"]["prompt"] == "The little robot" and "prompt" not in records["ids"]
    logprobs = records["lp"]["outputs"][0]["logprobs"]
    lp_tokens = records["lp"]["outputs"][0]["token_ids"]
    assert len(logprobs) == 3 and all(str(t) in step for t, step in zip(lp_tokens, logprobs))
    assert "logprobs" not in records["text"]["outputs"][0]


def test_resume_after_a_cut_off_write(tmp_path: Path, engine: Engine) -> None:
    lines = _prompt_lines(8)
    half = _write_jsonl(tmp_path / "half.jsonl", lines[:4])
    first = run_batch(_config(tmp_path, half), engine=engine, progress=False)
    assert (first["done"], first["errors"], first["skipped"]) == (4, 0, 0)
    out = tmp_path / "out.jsonl"
    with out.open("a") as f:  # what a kill in the middle of a write would leave
        f.write('{"id": "p4", "outputs": [{"ind')

    full = _write_jsonl(tmp_path / "in.jsonl", lines)
    second = run_batch(_config(tmp_path, full), engine=engine, progress=False)
    assert (second["done"], second["errors"], second["skipped"]) == (4, 0, 4)  # nothing recomputed
    assert second["prompt_tokens"] == 4 * 4
    records = _records(out)
    assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(8)]

    again = run_batch(_config(tmp_path, full), engine=engine, progress=False)
    assert (again["done"], again["errors"], again["skipped"]) == (0, 0, 8)


def test_interrupt_leaves_whole_lines_and_resumes(tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", _prompt_lines(8))
    real_step, calls = engine.step, []

    def step() -> Any:
        calls.append(1)
        if len(calls) == 12:  # mid-run: some records written, some requests in flight
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        run_batch(_config(tmp_path, inp, "max_inflight=3"), engine=engine, progress=False)
    monkeypatch.undo()
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not engine.has_unfinished()  # the in-flight requests were aborted
    written = len(_records(tmp_path / "out.jsonl"))
    assert 0 < written < 8

    summary = run_batch(_config(tmp_path, inp), engine=engine, progress=False)
    assert (summary["done"], summary["skipped"]) == (8 - written, written)
    assert sorted(r["id"] for r in _records(tmp_path / "out.jsonl")) == [f"p{i}" for i in range(8)]


def test_cli_exits_130_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import dsv4.serve.batch
    from dsv4.cli import main

    def interrupted(config: BatchConfig, **_: Any) -> dict[str, Any]:
        assert config.input == "in.jsonl" and config.retry_errors and config.sampling.max_tokens == 2
        raise KeyboardInterrupt

    monkeypatch.setattr(dsv4.serve.batch, "run_batch", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    argv = ["batch", "--input", "in.jsonl", "--output", "o.jsonl", "--retry-errors", "sampling.max_tokens=2"]
    assert main(argv) == 130
    assert signal.getsignal(signal.SIGTERM) is handler


def test_overrides_reach_engine_and_sampling(tmp_path: Path, batch_model_dir: Path) -> None:
    lines = [*_prompt_lines(3), {"id": "long", "prompt_token_ids": list(range(2, 22))}]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    cfg = _config(tmp_path, inp, f"model={batch_model_dir}", "sampling.max_tokens=3", "engine.max_model_len=16")
    assert cfg.engine.max_model_len == 16 and cfg.sampling.max_tokens == 3
    summary = run_batch(cfg, progress=False)  # builds its own engine from the config
    assert (summary["done"], summary["errors"]) == (3, 1)
    records = {r["id"]: r for r in _records(tmp_path / "out.jsonl")}
    assert all(len(records[f"p{i}"]["outputs"][0]["token_ids"]) == 3 for i in range(3))
    assert "max_model_len) is 16" in records["long"]["error"]


def test_rerun_on_finished_output_does_nothing(tmp_path: Path, engine: Engine,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lines = [*_prompt_lines(3), {"id": "p0", "prompt": "again"}, {"id": "bad", "prompt": 3}]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    first = run_batch(_config(tmp_path, inp), engine=engine, progress=False)
    assert (first["done"], first["errors"]) == (3, 2)
    records = _records(tmp_path / "out.jsonl")
    dup = next(r for r in records if "duplicate_of" in r)
    assert dup["id"] == "p0" and dup["line"] == 4 and "duplicate id 'p0'" in dup["error"]
    before = (tmp_path / "out.jsonl").read_bytes()

    # no engine is needed (the model path does not even exist): nothing is loaded, nothing written
    cfg = _config(tmp_path, inp, "model=/nonexistent/model")
    summary = run_batch(cfg, progress=False)
    assert (summary["done"], summary["errors"], summary["skipped"]) == (0, 0, 5)
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_bytes() == before

    # --retry-errors redoes the error records, and each id still has one record
    retry = run_batch(cfg.model_copy(update={"retry_errors": True}), engine=engine, progress=False)
    assert (retry["done"], retry["errors"], retry["skipped"]) == (0, 2, 3)
    ids = [r["id"] for r in _records(tmp_path / "out.jsonl") if "duplicate_of" not in r]
    assert sorted(ids) == ["bad", "p0", "p1", "p2"]
