"""HTTP plumbing: errors in OpenAI's shape, the request-size limit, and the server-sent-events response."""

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
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpm_infer.config import ConfigError
from cpm_infer.engine.generate import PromptTooLongError
from cpm_infer.serve.errors import INVALID, ServeError, error_body

log = logging.getLogger(__name__)

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; invalid requests are 400 (as OpenAI's API answers them)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = summarise_validation(exc.errors())
        return error_response(400, error_body(message, type_=INVALID, code="invalid_value", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only the first matching route's
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        code = _CODES.get(exc.status_code, "http_error")
        body = error_body(str(exc.detail), type_=INVALID if exc.status_code < 500 else "server_error", code=code)
        return error_response(exc.status_code, body, headers)

    @app.exception_handler(ConfigError)
    @app.exception_handler(PromptTooLongError)
    async def _bad_value(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, error_body(str(exc), type_=INVALID, code="invalid_value"))

    @app.exception_handler(ServeError)
    async def _serve(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.body())

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, error_body(f"unexpected {type(exc).__name__}", type_="server_error"))


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route takes at this path (asked of the router, so included routers count)."""
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]


def summarise_validation(errors: Any) -> tuple[str, str | None]:
    """Pydantic's error list as one line (``temperature: Input should be ...; ...``) and the first field named.

    A value that fits none of a union's shapes gives one error per shape: only the field's first one is kept."""
    parts, seen = [], set()
    param = None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
        field = loc[0] if loc else ""
        if field and field in seen:
            continue
        seen.add(field)
        param = param or field or None
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    line = "; ".join(parts) or "invalid request"
    return (line if len(line) <= 500 else line[:497] + "..."), param


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
                return {"type": "http.request", "body": repair_utf8(b"".join(chunks)), "more_body": False}
            return await receive()  # later calls wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over this server's limit of {self.max_bytes} bytes"
        body = error_body(message, type_=INVALID, code="request_too_large")
        await error_response(413, body)(scope, receive, send)


def repair_utf8(body: bytes) -> bytes:
    """The project's policy for bytes that are not UTF-8: replaced with U+FFFD, with a warning (JSON in
    UTF-16/32 is left to the JSON decoder, which detects it)."""
    try:
        body.decode("utf-8")
        return body
    except UnicodeDecodeError:
        if json.detect_encoding(body) != "utf-8":
            return body
    log.warning("request body: invalid UTF-8 replaced with U+FFFD")
    return body.decode("utf-8", "replace").encode("utf-8")


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
