"""The async front: streams match the offline engine, cancellation aborts and frees pages, queue bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsv4 import AsyncEngine, Engine, SamplingParams
from dsv4.engine.async_engine import QueueFullError


def test_stream_equals_offline_and_cancel_frees_pages(model_dir: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 6, 7], [9] * 20, [11, 12]]
    offline = [o.outputs[0].token_ids for o in Engine(model_dir).generate(prompts, params)]
    aengine = AsyncEngine(Engine(model_dir, max_num_batched_tokens=8))

    async def collect(prompt: list[int]) -> tuple[list[int], int]:
        updates, last = 0, None
        async for out in aengine.generate(prompt, params):
            updates += 1
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids, updates

    async def cancelled() -> None:
        async for out in aengine.generate([3] * 30, SamplingParams(max_tokens=200, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 2:
                break  # a client that goes away mid-stream

    async def main() -> None:
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled())
        for (tokens, updates), want in zip(results[:3], offline):
            assert tokens == want and updates == 10  # one update per generated token
        await asyncio.sleep(0.2)  # the abort is processed by the engine thread
        used = await aengine.call(lambda e: e.kv_stats()["total"]["bytes"])  # requests' (not the prefix cache's)
        assert used == 0 and aengine.num_pending == 0
        with pytest.raises(ValueError, match="empty"):
            async for _ in aengine.generate([], params):
                pass
        await aengine.shutdown()

    asyncio.run(main())


def test_queue_full_is_refused(model_dir: Path) -> None:
    aengine = AsyncEngine(Engine(model_dir), max_pending=1)

    async def main() -> None:
        long = aengine.generate([4] * 10, SamplingParams(max_tokens=30, ignore_eos=True))
        first = await long.__anext__()
        assert not first.finished
        with pytest.raises(QueueFullError):
            async for _ in aengine.generate([5], SamplingParams(max_tokens=2)):
                pass
        await long.aclose()
        await aengine.shutdown(drain=True, timeout=5)

    asyncio.run(main())
