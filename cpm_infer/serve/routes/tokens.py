"""``/tokenize`` and ``/detokenize``, as vLLM's server has them: the exact CPM token ids of a prompt (or of an essay
prompt ``title <sep> context``), with their SentencePiece pieces on request, and the text of token ids."""

# No ``from __future__ import annotations`` here: FastAPI reads the per-app request model from the
# handler's annotation, which must be the class itself, not a string naming a local variable.

from typing import Annotated, Any, Self

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from cpm_infer.prompts import encode
from cpm_infer.serve import docs, schemas
from cpm_infer.serve.routes import Served

_MODEL_DOC = "The served model's id (GET /v1/models); omitted = the served model."
# One of ``prompt`` or ``title`` (``context`` goes with ``title``): stated in the schema, checked in the model.
_ONE_OF = {
    "oneOf": [
        {"required": ["prompt"], "not": {"anyOf": [{"required": ["title"]}, {"required": ["context"]}]}},
        {"required": ["title"], "not": {"required": ["prompt"]}},
    ]
}


class TokenizeRequest(BaseModel):
    """POST /tokenize."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_ONE_OF)

    model: Annotated[str, Field(max_length=schemas.MAX_ID_CHARS)] | None = Field(None, description=_MODEL_DOC)
    # str, not str | None: the schema's oneOf counts a field as given when it is present, so null is refused
    prompt: str = Field(None, description="Text, tokenized as a completion's prompt is.")
    title: str = Field(None, description="Essay prompt `title <sep> context` (instead of `prompt`).")
    context: str = Field(None, description="The essay's beginning (with `title`).")
    with_pieces: bool = Field(False, description="Also answer the SentencePiece piece of each token.")

    @field_validator("model", "prompt", "title", "context")
    @classmethod
    def _clean_text(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else schemas.clean_field(value, info.field_name)

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        given = {name for name in ("prompt", "title", "context") if getattr(self, name) is not None}
        if given not in ({"prompt"}, {"title"}, {"title", "context"}):
            raise ValueError('give "prompt", or "title" with an optional "context"')
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (``tokens``: within this server's vocabulary, see ``detokenize_request_model``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(max_length=schemas.MAX_ID_CHARS)] | None = Field(None, description=_MODEL_DOC)
    tokens: list[int]


def detokenize_request_model(vocab_size: int) -> type[DetokenizeRequest]:
    """The request model with this server's vocabulary in it (so in its OpenAPI schema): other ids are a 400."""
    token = schemas.json_int(ge=0, lt=vocab_size)
    return create_model(  # named so in the OpenAPI schema
        "DetokenizeRequest",
        __base__=DetokenizeRequest,
        __module__=__name__,
        tokens=(list[token], Field(description="Token ids, as /tokenize answers them.")),
    )


def add_routes(router: APIRouter, served: Served) -> None:
    tokenizer = served.tokenizer
    detokenize_request = detokenize_request_model(tokenizer.vocab_size)

    @router.post(
        "/tokenize",
        response_model=docs.Tokenized,
        response_model_exclude_none=True,  # "pieces" only when asked
        responses=served.errors.only(400, 401, 404, 413),
    )
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """The token ids a completion's prompt (or essay prompt) becomes, and the model's context length."""
        served.check_model(body.model)
        request = {"prompt": body.prompt, "title": body.title, "context": body.context}
        ids = (await run_in_threadpool(encode, tokenizer, request)).ids  # as a completion's prompt is encoded
        answer: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": served.n_positions}
        if body.with_pieces:
            answer["pieces"] = [tokenizer.id_to_piece(i) for i in ids]
        return answer

    @router.post("/detokenize", response_model=docs.Detokenized, responses=served.errors.only(400, 401, 404, 413))
    async def detokenize(body: detokenize_request) -> dict[str, str]:
        """The text of token ids (as a completion's text is decoded)."""
        served.check_model(body.model)
        return {"prompt": tokenizer.decode(body.tokens)}
