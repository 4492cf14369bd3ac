"""``dsv4 serve`` on CUDA: a completion through the official ``openai`` client equals the CPU engine's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from openai import OpenAI

from dsv4 import Engine, SamplingParams
from dsv4.engine.async_engine import AsyncEngine
from dsv4.serve.app import build_app
from dsv4.serve.server import ServeConfig

PROMPT = "The robot counted the boats"
MAX_TOKENS = 12


@contextmanager
def _serving(engine: Engine, name: str) -> Iterator[str]:
    """The app ``dsv4 serve`` builds, on a uvicorn server at 127.0.0.1 (port 0) in a thread; its base URL."""
    app = build_app(AsyncEngine(engine, max_pending=16), model_name=name, shutdown_timeout=5)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        loop.close()

    thread = threading.Thread(target=run, name="uvicorn-gpu-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_completion_through_the_openai_client(checkpoint: Path) -> None:
    # the engine as `dsv4 serve model=DIR engine.device=cuda` builds it
    config = ServeConfig.model_validate({"model": str(checkpoint), "engine": {"device": "cuda", "max_model_len": 256}})
    engine = Engine(checkpoint, config=config.engine.model_copy(update={"model": str(checkpoint)}))
    assert engine.model.embed.weight.is_cuda and engine.pool.buffer(0, "win").is_cuda
    with _serving(engine, checkpoint.name) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=checkpoint.name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
    [choice] = r.choices
    cpu = Engine(checkpoint, max_model_len=256, native_kernels=False, packed_weights=False)
    [want] = cpu.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert choice.text == want.outputs[0].text
    assert choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
