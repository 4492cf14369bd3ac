"""ASGI middleware of the server: a request-body limit and request counting (plain ASGI, see CountRequests)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.serve.metrics import ServerMetrics
from dsv4.serve.protocol import OpenAIError

__all__ = ["BodyLimit", "CountRequests"]


class BodyLimit:
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


class CountRequests:
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
