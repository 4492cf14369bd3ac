"""Real HTTP servers over a tiny checkpoint, shared by the server tests.

Test modules cannot import this file (``--import-mode=importlib``), so the helpers are fixtures:
``serve_model_dir`` (a checkpoint with a 512-id byte tokenizer), ``launch_server`` (a uvicorn server on
127.0.0.1 in a background thread, port 0; ``aengine_class=`` swaps the :class:`AsyncEngine`, e.g. for one
that answers from a script) and ``kv_pages_used`` (pages held in every KV pool, read on the engine thread).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

import dsv4
from dsv4.core.config import ModelConfig
from dsv4.engine.async_engine import AsyncEngine
from dsv4.engine.engine import Engine
from dsv4.serve.app import build_app
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer

VOCAB = 512
MODEL_NAME = "tiny-dsv4"
MAX_MODEL_LEN = 256
START_TIMEOUT = 30.0


@dataclass
class RunningServer:
    """A server started by ``launch_server``: its address, app and engine."""

    port: int
    app: FastAPI
    aengine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        return MODEL_NAME

    def on_engine(self, fn: Callable[[Engine], Any], timeout: float = 10.0) -> Any:
        """``fn(engine)`` run on the engine thread (via the server's loop), from the test thread."""

        async def call() -> Any:
            return await self.aengine.call(fn)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def pages_used(self) -> dict[str, int]:
        """KV pages held now, per pool."""
        used: dict[str, int] = self.on_engine(_pages_used)
        return used

    def wait_idle(self, timeout: float = 10.0) -> dict[str, int]:
        """Wait until no request is pending and every KV pool page is free; the pages used per pool."""
        deadline = time.monotonic() + timeout
        used: dict[str, int] = {}
        while time.monotonic() < deadline:
            used = self.pages_used()
            if self.aengine.num_pending == 0 and not any(used.values()) and not self.on_engine(_has_work):
                return used
            time.sleep(0.05)
        return used


def _pages_used(engine: Engine) -> dict[str, int]:
    """Pages requests hold (not those only prefix-cache checkpoints hold)."""
    stats = engine.kv_stats()
    return {s: int(stats[s]["pages_used"] - stats[s]["pages_cached"]) for s in engine.pool.streams}


def _has_work(engine: Engine) -> bool:
    return engine.has_unfinished() or bool(engine.requests)


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V4 checkpoint with a 512-id byte tokenizer (its directory name is the model id)."""
    path = tmp_path_factory.mktemp("serve") / MODEL_NAME
    path.mkdir()
    model = random_model(ModelConfig.tiny(vocab_size=VOCAB, num_nextn_predict_layers=0), seed=5)
    dsv4.save_model(model, path)
    write_byte_tokenizer(path, vocab_size=VOCAB)
    return path


@contextmanager
def _running(
    model_dir: Path, *, api_key: str | None = None, max_pending: int | None = 256,
    max_body_bytes: int = 1 << 16, shutdown_timeout: float = 5.0, aengine_class: type[AsyncEngine] = AsyncEngine,
    **engine_options: Any,
) -> Iterator[RunningServer]:
    engine_options.setdefault("max_model_len", MAX_MODEL_LEN)
    engine_options.setdefault("max_num_seqs", 16)
    engine = Engine(model_dir, **engine_options)
    aengine = aengine_class(engine, max_pending=max_pending)
    app = build_app(aengine, model_name=MODEL_NAME, api_key=api_key, max_body_bytes=max_body_bytes,
                    shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) or None)
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        loop.close()

    thread = threading.Thread(target=run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(port, app, aengine, server, thread, loops[0], api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_timeout + 10)


@pytest.fixture(scope="session")
def launch_server(serve_model_dir: Path) -> Callable[..., AbstractContextManager[RunningServer]]:
    """``with launch_server(api_key=..., max_pending=..., aengine_class=..., **engine_options) as srv:`` a live
    server (of ``model_dir=`` when given)."""

    def launch(model_dir: Path | None = None, **options: Any) -> AbstractContextManager[RunningServer]:
        return _running(model_dir or serve_model_dir, **options)

    return launch


@pytest.fixture(scope="session")
def offline_engine(serve_model_dir: Path) -> Engine:
    """The same checkpoint in an offline :class:`Engine` (the reference for the server's answers)."""
    return Engine(serve_model_dir, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def metric_value() -> Callable[[str, str], float]:
    """``metric_value(text, name)``: the sum of a Prometheus sample over its labels (0 when absent)."""

    def value(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, val = line.rpartition(" ")
            if key.split("{", 1)[0] == name:
                total += float(val)
        return total

    return value
