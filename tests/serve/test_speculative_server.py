"""Speculative decoding through the server and the batch runner: ``usage.spec_accept_length``, the
``dsv4_spec_*`` metrics, and the same greedy answers as without it."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

import dsv4
from dsv4 import Engine
from dsv4.core.config import ModelConfig
from dsv4.core.runconfig import load_run_config
from dsv4.serve.batch import BatchConfig, run_batch
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer


@pytest.fixture(scope="module")
def mtp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny-dsv4"
    path.mkdir()
    dsv4.save_model(random_model(ModelConfig.tiny(vocab_size=512), seed=5), path)  # with its MTP block
    write_byte_tokenizer(path, vocab_size=512)
    return path


def test_usage_and_metrics(launch_server: Callable[..., AbstractContextManager[Any]], mtp_model_dir: Path,
                           metric_value: Callable[[str, str], float]) -> None:
    body = {"model": "tiny-dsv4", "prompt": "The rain in Spain", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    with launch_server(model_dir=mtp_model_dir) as plain, httpx.Client(base_url=plain.url, timeout=30) as c:
        want = c.post("/v1/completions", json=body).json()
    assert "spec_accept_length" not in want["usage"]
    with launch_server(model_dir=mtp_model_dir, speculative="mtp") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        got = c.post("/v1/completions", json=body).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        accept = got["usage"]["spec_accept_length"]
        assert 1.0 <= accept <= 4.0
        streamed = [json.loads(line[6:]) for line in c.post(
            "/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}}
        ).text.splitlines() if line.startswith("data: {")]
        assert streamed[-1]["usage"]["spec_accept_length"] == accept
        stats = srv.on_engine(lambda e: e.spec_stats())
        text = c.get("/metrics").text
        assert metric_value(text, "dsv4_spec_steps_total") == stats["steps"] > 0
        assert metric_value(text, "dsv4_spec_draft_tokens_total") == stats["draft_tokens"] == 3 * stats["steps"]
        assert metric_value(text, "dsv4_spec_accepted_tokens_total") == stats["accepted_tokens"]
        assert metric_value(text, "dsv4_spec_accept_length") == pytest.approx(stats["accept_length"])
        assert metric_value(text, "dsv4_spec_request_accept_length_count") == 2
        verified = sum(stats["position_verified"])
        assert metric_value(text, "dsv4_spec_position_drafts_total") == verified + stats["accepted_tokens"]


def test_batch_runner_reports_the_accept_length(tmp_path: Path, mtp_model_dir: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"item {i}:"}) + "\n" for i in range(3)))
    config = load_run_config(BatchConfig, None, [f"input={inp}", f"output={tmp_path / 'out.jsonl'}",
                                                 "sampling.temperature=0", "sampling.max_tokens=8",
                                                 "sampling.ignore_eos=true"])
    run_batch(config, engine=Engine(mtp_model_dir, speculative="mtp"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["usage"]["spec_accept_length"] >= 1.0 for r in records)
