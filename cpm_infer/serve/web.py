"""HTTP plumbing: one JSON error shape, the request-size limit, and the server-sent-events response."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpm_infer.config import ConfigError
from cpm_infer.generate import PromptTooLongError
from cpm_infer.serve.batcher import ServeError

log = logging.getLogger(__name__)

_KINDS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request",
}


def error_body(status: int, kind: str, message: str) -> dict[str, Any]:
    """Every error the server sends: ``{"error": {"type", "message", "status"}}`` (also as an SSE event)."""
    return {"error": {"type": kind, "message": message, "status": status}}


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, kind, message), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", summarise_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _KINDS.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(ConfigError)
    @app.exception_handler(PromptTooLongError)
    async def _bad_value(_: Request, exc: Exception) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(ServeError)
    async def _serve(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.kind, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "server_error", f"unexpected {type(exc).__name__}")


def summarise_validation(errors: Any) -> str:
    """Pydantic's error list as one line: ``temperature: Input should be a valid number; ...``."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    line = "; ".join(parts) or "invalid request"
    return line if len(line) <= 500 else line[:497] + "..."


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before anything parses them.

    The body is read here (it is small by construction) and replayed to the app, so a chunked upload
    without Content-Length is bounded too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over this server's limit of {self.max_bytes} bytes"
        await error_response(413, "request_too_large", message)(scope, receive, send)


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying JSON (or a literal such as ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that calls ``on_close`` however it ends: finished, failed, or
    the client went away (Starlette cancels the stream; with ASGI 2.4 servers the send fails)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], object]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
