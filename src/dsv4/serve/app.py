"""The HTTP face of the engine: OpenAI-compatible and native routes over an :class:`AsyncEngine`.

The routes live here; the rest of the server is by concept: ``protocol`` (request schemas), ``chat`` (chat
prompts, and output read back as reasoning / content / tool calls), ``wire`` (OpenAI's response pieces),
``streaming`` (engine streams as SSE, disconnects) and ``middleware`` (body limit, request counting).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.engine.async_engine import AsyncEngine
from dsv4.engine.engine import Engine
from dsv4.engine.outputs import CompletionOutput, RequestOutput
from dsv4.serve.chat import ChoiceReader, chat_constraint, render_chat_prompt
from dsv4.serve.metrics import ServerMetrics
from dsv4.serve.middleware import BodyLimit, CountRequests
from dsv4.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    OpenAIError,
    TokenizeRequest,
)
from dsv4.serve.streaming import advanced, chain, collect, first, merge, sse, stream_or_error
from dsv4.serve.streaming import generate as engine_stream
from dsv4.serve.wire import Usage, chat_logprobs, completion_logprobs, validation_body

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

    _warm_chat_template(engine)
    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.aengine = aengine
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)

    # ---------------------------------------------------------------------------------------- errors
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message, param = str(e.detail), None
        if e.status_code == 400 and message == _FASTAPI_BODY_ERROR:  # a body json.loads could not take
            message, param = "request body is not valid JSON (not UTF-8 text, or nested too deeply)", "body"
        return JSONResponse(OpenAIError(message, status=e.status_code, type=kind, param=param).body(),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, e: Exception) -> JSONResponse:
        # A bug: still an OpenAI-style body (Starlette logs the traceback and re-raises after this answer).
        return JSONResponse(OpenAIError(f"internal error: {type(e).__name__}", status=500, type="server_error").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(e.errors()), status_code=400)

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

    @app.post("/flush_cache", dependencies=auth)
    async def flush_cache() -> dict[str, Any]:
        """Drop every prefix-cache checkpoint (running requests keep theirs)."""
        if not aengine.alive:
            raise OpenAIError("the engine is not running", status=503, type="server_error")
        return {"flushed_checkpoints": await aengine.call(lambda e: e.flush_cache())}

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
        given = req.structured()
        params = [req.sampling_params(max_tokens=budget(len(i), req.max_tokens, "prompt"), logprobs=req.logprobs,
                                      structured=given[0] if given is not None else None) for i in ids]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else "" for p in prompts]

        def choice(k: int, c: CompletionOutput, delta: str, start: int, final: bool) -> dict[str, Any]:
            text = (echo[k] if req.echo and (final or start == 0) else "") + delta
            return {"index": k * req.n + c.index, "text": text,
                    "logprobs": (completion_logprobs(engine, c, start, req.logprobs)
                                 if req.logprobs is not None else None),
                    "finish_reason": c.finish_reason}

        streams = [engine_stream(aengine, metrics, i, p, f"{rid}-{k}") for k, (i, p) in enumerate(zip(ids, params))]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncGenerator[str, None]:
                usage = Usage()
                async for k, out, prev in merge(streams):
                    usage.update(k, out)
                    choices = [choice(k, c, c.text[prev[c.index].text:], prev[c.index].tokens, False)
                               for c in out.outputs if advanced(c, prev[c.index], req.logprobs is not None)]
                    if choices:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                    "choices": choices})
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                "choices": [], "usage": usage.body()})
                yield "data: [DONE]\n\n"

            return await stream_or_error(events())
        finals = await collect(request, streams)
        usage = Usage()
        choices = []
        for k, out in enumerate(finals):
            usage.update(k, out)
            choices += [choice(k, c, c.text, 0, True) for c in out.outputs]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage.body()})

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        tok = tokenizer()
        text, mode = render_chat_prompt(tok, req)
        ids = tok.encode(text)
        max_tokens = budget(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        params = req.sampling_params(max_tokens=max_tokens, logprobs=(top or 0) if req.logprobs else None,
                                     structured=chat_constraint(req, mode))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = engine_stream(aengine, metrics, ids, params, rid)
        readers = [ChoiceReader(mode) for _ in range(req.n)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": choices, **extra})

            async def events() -> AsyncGenerator[str, None]:
                merged = merge([stream])
                head = await first(merged)  # errors (bad prompt, queue full) surface as a 4xx here
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for j in range(req.n)])
                usage = Usage()
                async for _, out, prev in chain(head, merged):
                    usage.update(0, out)
                    choices = []
                    for c in out.outputs:
                        if not advanced(c, prev[c.index], req.logprobs):
                            continue
                        start_text, start_tok = prev[c.index].text, prev[c.index].tokens
                        reader = readers[c.index]
                        delta = reader.delta(c, start_text)
                        new_tokens = req.logprobs and len(c.token_ids) > start_tok
                        if not delta and c.finish_reason is None and not new_tokens:
                            continue  # text held back: it might start a marker
                        choices.append({"index": c.index, "delta": delta,
                                        "logprobs": (chat_logprobs(engine, c, start_tok, top or 0)
                                                     if req.logprobs else None),
                                        "finish_reason": reader.finish_reason(c)})
                    if choices:
                        yield chunk(choices)
                if include_usage:
                    yield chunk([], usage=usage.body())
                yield "data: [DONE]\n\n"

            return await stream_or_error(events())
        [out] = await collect(request, [stream])
        usage = Usage()
        usage.update(0, out)
        choices = [{"index": c.index, "message": readers[c.index].message(c),
                    "logprobs": chat_logprobs(engine, c, 0, top or 0) if req.logprobs else None,
                    "finish_reason": readers[c.index].finish_reason(c)} for c in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage.body()})

    @app.post("/generate", dependencies=auth, response_model=None)
    async def generate(req: GenerateRequest, request: Request) -> Response:
        if (req.input_ids is None) == (req.text is None):
            raise OpenAIError("give exactly one of input_ids or text", param="input_ids")
        ids = req.input_ids if req.input_ids is not None else _encode(tokenizer, req.text or "")
        params = req.engine_params()
        rid = req.rid or f"gen-{uuid.uuid4().hex}"
        stream = engine_stream(aengine, metrics, ids, params, rid)

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
                async for _, out, _prev in merge([stream]):
                    yield sse(body(out))
                yield "data: [DONE]\n\n"

            return await stream_or_error(events())
        [out] = await collect(request, [stream])
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
# FastAPI's detail for a body that is not JSON it could decode (bad UTF-8, nesting past the recursion limit).
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _engine_snapshot(engine: Engine) -> dict[str, Any]:
    """Gauges, read on the engine thread."""
    sched: Any = engine.scheduler  # queue lengths: FCFS-like schedulers' lists, not part of the Protocol
    kv = engine.kv_stats()
    return {
        "running": len(getattr(sched, "running", ())),
        "waiting": len(getattr(sched, "waiting", ())),
        "pages": {s: (kv[s]["pages_used"] - kv[s]["pages_cached"], kv[s]["pages_cached"], kv[s]["pages_free"])
                  for s in engine.pool.streams},
        "prefix_cache": kv["prefix_cache"],
        "expert_load": engine.expert_load(),
        "spec": engine.spec_stats(),
    }


def _warm_chat_template(engine: Engine) -> None:
    """Compile the chat template now rather than in the first chat request (tens of milliseconds)."""
    if engine.tokenizer is not None:
        try:
            engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        except ValueError:  # a template with demands of its own: the first request will say what they are
            pass


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
