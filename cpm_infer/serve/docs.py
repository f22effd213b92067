"""What the OpenAPI schema says about answers: response shapes, and every error status each route can send.

FastAPI documents a 422 for every route with parameters; this server answers invalid requests with 400 (as
OpenAI's API does), so ``honest_openapi`` removes those 422 entries.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A completion; with ``stream`` the same object arrives in pieces (one choice each) as server-sent events,
    then ``data: [DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None
    timings: dict[str, float] | None = None


class Tokenized(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="The model's context: prompt and new tokens together.")
    pieces: list[str] | None = Field(None, description="Each token's SentencePiece piece (with `with_pieces`).")


class Detokenized(BaseModel):
    prompt: str


_WHY = {
    400: "Invalid request: a value out of range, a prompt too long for the context, an unsupported option.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "Unknown model id.",
    413: "Request body over the server's limit.",
    500: "Generation failed.",
    503: "The queue is full, or the server is shutting down.",
    504: "The request did not finish within the server's timeout.",
}

METRICS_200: dict[str, Any] = {
    "description": "Prometheus text exposition format.",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


class ErrorResponses:
    def __init__(self, auth: bool) -> None:
        self.auth = auth

    def only(self, *statuses: int) -> dict[int | str, dict[str, Any]]:
        return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses if s != 401 or self.auth}


def error_responses(auth: bool) -> ErrorResponses:
    return ErrorResponses(auth)


def completion_responses(errors: ErrorResponses) -> dict[int | str, dict[str, Any]]:
    # Before OpenAPI 3.2 an event stream's schema describes one event (a server-sent event's fields).
    event = {
        "type": "object",
        "description": "Each event's `data` is a completion chunk (JSON) or an error object; the last is `[DONE]`.",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
        "required": ["data"],
    }
    stream = {"schema": event}
    return {
        200: {"model": Completion, "description": "The completion.", "content": {"text/event-stream": stream}},
        **errors.only(400, 401, 404, 413, 500, 503, 504),
    }


def honest_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
