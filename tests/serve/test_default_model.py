"""The bundled default model: the addition recipe's trained checkpoint, served by ``dsv4 serve`` with no arguments.

It must stay what the README promises: ≤ 20 MB with its tokenizer and config, and ≥ 90 % greedy accuracy on
3-digit additions it never saw in training (the task's held-out split, which no seed trains on).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import dsv4
from dsv4 import Engine, SamplingParams
from dsv4.assets import DEFAULT_MODEL_NAME, default_model_dir
from dsv4.rl.tasks import AdditionTask, split_of

ASSET = Path(dsv4.__file__).parent / "assets" / "default"


def test_shipped_with_tokenizer_and_config_within_20mb() -> None:
    assert default_model_dir() == ASSET
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (ASSET / name).is_file(), name
    total = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert total <= 20 * 1024 * 1024, f"{total / 2**20:.1f} MB"


def test_adds_unseen_3digit_numbers() -> None:
    problems = AdditionTask(seed=20261125).unseen_3digit(400)  # not the recipe's evaluation list either
    assert all(split_of(*p.operands) == "heldout" for p in problems)
    engine = Engine(ASSET)
    outs = engine.generate([p.prompt for p in problems], SamplingParams(temperature=0, max_tokens=6))
    right = sum(o.outputs[0].text == p.answer and o.outputs[0].finish_reason == "stop"
                for p, o in zip(problems, outs, strict=True))
    assert right / len(problems) >= 0.9, right / len(problems)


def test_dsv4_serve_with_no_arguments(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "dsv4"), "serve", "--port", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, port = time.monotonic() + 60, None
        while port is None and time.monotonic() < deadline:
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            port = int(m.group(1)) if m else None
            assert proc.poll() is None, log.read_text(errors="replace")
            time.sleep(0.05)
        assert port is not None, log.read_text(errors="replace")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
            r = c.post("/v1/completions", json={"model": DEFAULT_MODEL_NAME, "prompt": "123+456=", "temperature": 0,
                                                "max_tokens": 6})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == ("579", "stop")
            # a completion model: the chat template makes the last user message the prompt
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "250+250="}],
                                                     "temperature": 0, "max_tokens": 6})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "500"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
