"""The HTTP face of the engine: OpenAI-compatible and native routes over an :class:`AsyncEngine`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from dsv4.engine.engine import Engine
from dsv4.engine.outputs import CompletionOutput, Logprob, RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.serve.metrics import RequestTimer, ServerMetrics
from dsv4.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    OpenAIError,
    TokenizeRequest,
)

__all__ = ["build_app"]


def build_app(
    aengine: AsyncEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 4 << 20,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The FastAPI app serving ``aengine`` as ``model_name``."""
    engine = aengine.engine
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        logger.info("draining in-flight requests before exit")
        await aengine.shutdown(drain=True, timeout=shutdown_timeout)

    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.aengine = aengine
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)

    # ---------------------------------------------------------------------------------------- errors
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(OpenAIError(str(e.detail), status=e.status_code, type=kind).body(),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(e.errors()), status_code=400)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise OpenAIError("invalid or missing API key (Authorization: Bearer <key>)", status=401,
                              type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(f"The model `{name}` does not exist.", status=404, param="model",
                              code="model_not_found")

    def tokenizer() -> Any:
        if engine.tokenizer is None:
            raise OpenAIError("this model has no tokenizer: use /generate with input_ids", status=400)
        return engine.tokenizer

    def budget(prompt_len: int, asked: int | None, param: str) -> int:
        """``max_tokens`` for a prompt: what was asked, if it fits the context (else 400, like OpenAI)."""
        if prompt_len >= engine.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {engine.max_model_len} tokens; the "
                              f"prompt has {prompt_len}", param=param, code="context_length_exceeded")
        if asked is None:
            return room(prompt_len)
        if prompt_len + asked > engine.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        return asked

    def room(prompt_len: int) -> int:
        return max(1, engine.max_model_len - prompt_len)

    # ---------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if not aengine.alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if aengine.alive:
            metrics.update_engine(await aengine.call(_engine_snapshot))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _START,
                                            "owned_by": "dsv4", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        if req.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError("best_of must equal n (no server-side ranking)", param="best_of")
        prompts = req.prompts()
        ids = [_encode(tokenizer, p) for p in prompts]
        for i in ids:  # before the echo below decodes them
            _check_vocab(engine, i, "prompt")
        params = [req.sampling_params(max_tokens=budget(len(i), req.max_tokens, "prompt"), logprobs=req.logprobs)
                  for i in ids]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else "" for p in prompts]

        def choice(k: int, c: CompletionOutput, delta: str, start: int, final: bool) -> dict[str, Any]:
            text = (echo[k] if req.echo and (final or start == 0) else "") + delta
            return {"index": k * req.n + c.index, "text": text,
                    "logprobs": (_completion_logprobs(engine, c, start, req.logprobs)
                                 if req.logprobs is not None else None),
                    "finish_reason": c.finish_reason}

        streams = [_generate(aengine, metrics, i, p, f"{rid}-{k}") for k, (i, p) in enumerate(zip(ids, params))]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncGenerator[str, None]:
                usage = _Usage()
                async for k, out, prev in _merge(streams):
                    usage.update(k, out)
                    choices = [choice(k, c, c.text[prev[c.index][0]:], prev[c.index][1], False)
                               for c in out.outputs if _advanced(c, prev[c.index], req.logprobs is not None)]
                    if choices:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                    "choices": choices})
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                "choices": [], "usage": usage.body()})
                yield "data: [DONE]\n\n"

            return await _stream_or_error(events())
        finals = await _collect(request, streams)
        usage = _Usage()
        choices = []
        for k, out in enumerate(finals):
            usage.update(k, out)
            choices += [choice(k, c, c.text, 0, True) for c in out.outputs]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage.body()})

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        if req.response_format is not None and req.response_format.type != "text":
            raise OpenAIError("only response_format type 'text' is supported", param="response_format")
        tok = tokenizer()
        try:
            text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages],
                                           add_generation_prompt=True, tools=req.tools,
                                           **(req.chat_template_kwargs or {}))
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        ids = tok.encode(text)
        max_tokens = budget(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        params = req.sampling_params(max_tokens=max_tokens, logprobs=(top or 0) if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = _generate(aengine, metrics, ids, params, rid)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                             "choices": choices, **extra})

            async def events() -> AsyncGenerator[str, None]:
                merged = _merge([stream])
                first = await _first(merged)  # errors (bad prompt, queue full) surface as a 4xx here
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for j in range(req.n)])
                usage = _Usage()
                async for _, out, prev in _chain(first, merged):
                    usage.update(0, out)
                    choices = []
                    for c in out.outputs:
                        if not _advanced(c, prev[c.index], req.logprobs):
                            continue
                        start_text, start_tok = prev[c.index]
                        delta = c.text[start_text:]
                        choices.append({"index": c.index, "delta": {"content": delta} if delta else {},
                                        "logprobs": (_chat_logprobs(engine, c, start_tok, top or 0)
                                                     if req.logprobs else None),
                                        "finish_reason": c.finish_reason})
                    if choices:
                        yield chunk(choices)
                if include_usage:
                    yield chunk([], usage=usage.body())
                yield "data: [DONE]\n\n"

            return await _stream_or_error(events())
        [out] = await _collect(request, [stream])
        usage = _Usage()
        usage.update(0, out)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(engine, c, 0, top or 0) if req.logprobs else None,
                    "finish_reason": c.finish_reason} for c in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage.body()})

    @app.post("/generate", dependencies=auth, response_model=None)
    async def generate(req: GenerateRequest, request: Request) -> Response:
        if (req.input_ids is None) == (req.text is None):
            raise OpenAIError("give exactly one of input_ids or text", param="input_ids")
        ids = req.input_ids if req.input_ids is not None else _encode(tokenizer, req.text or "")
        fields = dict(req.sampling_params)
        fields.setdefault("max_tokens", fields.pop("max_new_tokens", None) or 128)
        if req.return_logprob:
            fields["logprobs"] = req.top_logprobs_num
        try:
            params = SamplingParams(**fields)
        except ValueError as e:
            raise OpenAIError(str(e), param="sampling_params") from None
        rid = req.rid or f"gen-{uuid.uuid4().hex}"
        stream = _generate(aengine, metrics, ids, params, rid)

        def body(out: RequestOutput) -> dict[str, Any]:
            c = out.outputs[0]
            meta: dict[str, Any] = {"id": out.request_id, "prompt_tokens": len(out.prompt_token_ids),
                                    "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
            if req.return_logprob and c.logprobs is not None:
                meta["output_token_logprobs"] = [[d[t].logprob, t] for d, t in zip(c.logprobs, c.token_ids)]
                meta["output_top_logprobs"] = [[[v.logprob, k] for k, v in d.items() if v.rank <= req.top_logprobs_num]
                                               for d in c.logprobs]
            return {"text": c.text, "output_ids": c.token_ids, "meta_info": meta}

        if req.stream:
            async def events() -> AsyncGenerator[str, None]:
                async for _, out, _prev in _merge([stream]):
                    yield _sse(body(out))
                yield "data: [DONE]\n\n"

            return await _stream_or_error(events())
        [out] = await _collect(request, [stream])
        return JSONResponse(body(out))

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        tok = tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            try:
                text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages],
                                               add_generation_prompt=req.add_generation_prompt)
            except ValueError as e:
                raise OpenAIError(str(e), param="messages") from None
        else:
            text = req.prompt or ""
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        _check_vocab(engine, req.tokens, "tokens")
        return {"prompt": tokenizer().decode(req.tokens, skip_special_tokens=False)}

    return app


# -------------------------------------------------------------------------------------------- helpers
_START = int(time.time())


def _engine_snapshot(engine: Engine) -> dict[str, Any]:
    """Gauges, read on the engine thread."""
    sched: Any = engine.scheduler  # queue lengths: FCFS-like schedulers' lists, not part of the Protocol
    pool = engine.pool
    return {
        "running": len(getattr(sched, "running", ())),
        "waiting": len(getattr(sched, "waiting", ())),
        "pages": {s: (pool.pages_used(s), pool.pages_free(s)) for s in pool.streams},
        "expert_load": engine.expert_load(),
    }


def _check_vocab(engine: Engine, ids: Sequence[int], param: str) -> None:
    vocab = engine.model.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise OpenAIError(f"token id {bad} is outside the vocabulary (0 … {vocab - 1})", param=param)


def _encode(tokenizer: Callable[[], Any], prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids: list[int] = tokenizer().encode(prompt)
        return ids
    return list(prompt)


async def _generate(
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
                    timer.done(len(out.prompt_token_ids))
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


async def _merge(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput, dict[int, tuple[int, int]]]]:
    """Interleave several request streams; yields (stream index, output, what was sent before per choice)."""
    sent: list[dict[int, tuple[int, int]]] = [{} for _ in streams]
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
            before = {c.index: sent[k].get(c.index, (0, 0)) for c in item.outputs}
            yield k, item, before
            for c in item.outputs:
                sent[k][c.index] = (len(c.text), len(c.token_ids))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


async def _first(it: AsyncIterator[Any]) -> Any:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _advanced(c: CompletionOutput, before: tuple[int, int], per_token: bool) -> bool:
    """Whether a choice has something to send: text, a finish, or (with logprobs) new tokens."""
    new_tokens = per_token and len(c.token_ids) > before[1]
    return len(c.text) > before[0] or new_tokens or c.finish_reason is not None


async def _collect(request: Request, streams: Sequence[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Final outputs of non-streaming requests; a client that disconnects aborts them."""
    finals: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for k, out, _ in _merge(streams):
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


async def _stream_or_error(events: AsyncGenerator[str, None]) -> Response:
    """Start an SSE stream; an error before the first event (bad prompt, queue full) is a plain 4xx."""
    try:
        first = await events.__anext__()
    except OpenAIError:
        await events.aclose()
        raise
    except StopAsyncIteration:
        first = ""

    async def body() -> AsyncIterator[str]:
        yield first
        try:
            async for event in events:
                yield event
        except OpenAIError as e:  # mid-stream: the status line is gone, report in-band
            yield _sse(e.body())
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Usage:
    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def update(self, k: int, out: RequestOutput) -> None:
        self.prompt[k] = len(out.prompt_token_ids) * max(1, len(out.outputs))
        self.completion[k] = sum(len(c.token_ids) for c in out.outputs)

    def body(self) -> dict[str, int]:
        p, c = sum(self.prompt.values()), sum(self.completion.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token], skip_special_tokens=False) if engine.tokenizer else str(token)


def _completion_logprobs(engine: Engine, c: CompletionOutput, start: int, n: int) -> dict[str, Any]:
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


def _chat_logprobs(engine: Engine, c: CompletionOutput, start: int, n: int) -> dict[str, Any]:
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


def _validation_body(errors: Sequence[Any]) -> dict[str, Any]:
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"Unrecognized request argument supplied: {where}")
        elif kind == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg', ''))}")
            where = "body"
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        param = param or where
    return OpenAIError("; ".join(parts) or "invalid request", param=param).body()


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (declared or actual length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = OpenAIError(f"request body larger than {self.max_bytes} bytes", status=413)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
            return
        seen, over = 0, False

        async def limited() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            # FastAPI turns an exception raised while it reads the body into its own 400: drop that answer.
            if not over:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            pass
        if over:
            await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass


class _CountRequests:
    """Count requests by route and status.

    Plain ASGI on purpose: an ``@app.middleware("http")`` (BaseHTTPMiddleware) wraps ``receive`` so that
    ``Request.is_disconnected()`` never reports a client that went away.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
