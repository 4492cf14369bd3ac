"""Engine streams as HTTP: request-level errors mapped to HTTP ones, several streams interleaved, SSE framing,
and clients that leave aborting their requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from loguru import logger

from dsv4.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from dsv4.engine.outputs import CompletionOutput, RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.serve.metrics import RequestTimer, ServerMetrics
from dsv4.serve.protocol import OpenAIError

__all__ = ["Sent", "advanced", "chain", "collect", "first", "generate", "merge", "sse", "stream_or_error"]


class Sent(NamedTuple):
    """What a stream already sent of one choice: characters, tokens, and whether it sent its finish."""

    text: int = 0
    tokens: int = 0
    finished: bool = False


async def generate(
    aengine: AsyncEngine, metrics: ServerMetrics, ids: list[int], params: SamplingParams, rid: str
) -> AsyncIterator[RequestOutput]:
    """The engine's stream of one request, with request-level errors mapped to HTTP ones."""
    timer = RequestTimer(metrics)
    finished = refused = False
    try:
        # aclosing: a client that goes away closes this stream, and with it the engine's (which aborts the
        # request) right away, not whenever the garbage collector finalizes it
        async with aclosing(aengine.generate(ids, params, request_id=rid)) as outputs:
            async for out in outputs:
                timer.tokens_out(sum(len(c.token_ids) for c in out.outputs))
                if out.finished:
                    finished = True
                    timer.done(len(out.prompt_token_ids),
                               out.metrics.spec_accept_length if out.metrics is not None else None)
                yield out
    except QueueFullError as e:
        refused = True
        raise OpenAIError(f"server busy: {e}", status=429, type="rate_limit_error", code="queue_full") from None
    except EngineDeadError as e:
        raise OpenAIError(f"engine unavailable: {e}", status=503, type="server_error") from None
    except ValueError as e:  # the engine refused the prompt
        refused = True
        raise OpenAIError(str(e)) from None
    finally:
        if not finished and not refused:  # refused requests never ran: not an abort
            metrics.aborted.inc()


async def merge(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput, dict[int, Sent]]]:
    """Interleave several request streams; yields (stream index, output, what was sent before per choice)."""
    sent: list[dict[int, Sent]] = [{} for _ in streams]
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(k: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await queue.put((k, out))
            await queue.put((k, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((k, e))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            k, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            before = {c.index: sent[k].get(c.index, Sent()) for c in item.outputs}
            yield k, item, before
            for c in item.outputs:
                sent[k][c.index] = Sent(len(c.text), len(c.token_ids), c.finish_reason is not None)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


async def first(it: AsyncIterator[Any]) -> Any:
    """The first item of ``it`` (None when it is empty): its errors surface before a response starts."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def chain(head: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``head`` (unless None) and then the rest of the stream it came from."""
    if head is not None:
        yield head
    async for item in rest:
        yield item


def advanced(c: CompletionOutput, before: Sent, per_token: bool) -> bool:
    """Whether a choice has something to send: text, a finish, or (with logprobs) new tokens. A choice that
    finished is sent once: with ``n > 1`` the request's later outputs repeat it."""
    if before.finished:
        return False
    new_tokens = per_token and len(c.token_ids) > before.tokens
    return len(c.text) > before.text or new_tokens or c.finish_reason is not None


async def collect(request: Request, streams: Sequence[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Final outputs of non-streaming requests; a client that disconnects aborts them."""
    finals: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for k, out, _ in merge(streams):
            if out.finished:
                finals[k] = out

    task = asyncio.create_task(run())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise OpenAIError("client disconnected", status=499)
    task.result()
    return [finals[k] for k in range(len(streams))]


async def stream_or_error(events: AsyncGenerator[str, None]) -> Response:
    """Start an SSE stream; an error before the first event (bad prompt, queue full) is a plain 4xx."""
    try:
        head = await events.__anext__()
    except OpenAIError:
        await events.aclose()
        raise
    except StopAsyncIteration:
        head = ""

    async def body() -> AsyncIterator[str]:
        yield head
        try:
            async for event in events:
                yield event
        except OpenAIError as e:  # mid-stream: the status line is gone, report in-band
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - a bug: still an OpenAI-style error, and the stream ends cleanly
            logger.exception("error in a response stream")
            yield sse(OpenAIError(f"internal error: {type(e).__name__}", status=500, type="server_error").body())
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

