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
    """A request the server could not serve; ``status`` is its HTTP status."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), type_=self.type, code=self.code, param=self.param)


class InvalidRequestError(ServeError):
    status, type, code = 400, INVALID, "invalid_value"


class ModelNotFoundError(ServeError):
    status, type, code = 404, INVALID, "model_not_found"


class AuthenticationError(ServeError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class QueueFullError(ServeError):
    status, code = 503, "queue_full"


class ShuttingDownError(ServeError):
    status, code = 503, "shutting_down"


class RequestTimeoutError(ServeError):
    status, type, code = 504, "timeout", "timeout"


class ClientGoneError(ServeError):
    status, code = 499, "client_closed_request"


class GenerationFailedError(ServeError):
    status, code = 500, "generation_failed"


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
