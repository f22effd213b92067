"""The errors the server answers, all in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``type`` follows OpenAI's names (``invalid_request_error``, ``authentication_error``, ``server_error``) so that
OpenAI clients raise their usual exceptions; ``code`` says precisely what happened (``model_not_found``,
``queue_full``, ``timeout``, ...).
"""

from __future__ import annotations

from typing import Any

from cpm_infer.errors import CpmError

INVALID = "invalid_request_error"


class ServeError(CpmError):
    """A request the server could not serve; ``status`` is its HTTP status. A subclass states its status, OpenAI
    error type and code in its header: ``class QueueFullError(ServeError, status=503, code="queue_full")``."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init_subclass__(cls, *, status: int = 0, type: str = "", code: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.status, cls.type, cls.code = status or cls.status, type or cls.type, code or cls.code

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), type_=self.type, code=self.code, param=self.param)


class InvalidRequestError(ServeError, status=400, type=INVALID, code="invalid_value"): ...


class ModelNotFoundError(ServeError, status=404, type=INVALID, code="model_not_found"): ...


class AuthenticationError(ServeError, status=401, type="authentication_error", code="invalid_api_key"): ...


class QueueFullError(ServeError, status=503, code="queue_full"): ...


class ShuttingDownError(ServeError, status=503, code="shutting_down"): ...


class RequestTimeoutError(ServeError, status=504, type="timeout", code="timeout"): ...


class ClientGoneError(ServeError, status=499, code="client_closed_request"): ...


class GenerationFailedError(ServeError, status=500, code="generation_failed"): ...


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
