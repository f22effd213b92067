"""Request shapes of the HTTP API: OpenAI's Completions request plus CPM's extras, and the seed's essay route.

The limits the server enforces are in the models (so in the OpenAPI schema); the ones that depend on the
server (``max_tokens`` cap, ``n`` cap, the vocabulary) come from ``completion_request_model(settings, vocab)``.
What JSON Schema cannot say (a prompt's length in tokens, ``prompts x n`` over the cap) is a documented 400.
Text fields follow the project's policy for broken Unicode: lone surrogates become U+FFFD, with a warning.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine.generate import PromptTooLongError
from cpm_infer.prompts import essay_prompt
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.settings import MAX_BIAS, Setting, for_door
from cpm_infer.text import clean_field as policy_clean_field
from cpm_infer.tokenizer import CpmTokenizer

log = logging.getLogger(__name__)

MAX_STOP_CHARS, MAX_ID_CHARS = 256, 256

# The seed service's (yangjianxin1/CPM http_service.py) sampling defaults for /zuowen.
ESSAY_TEMPERATURE, ESSAY_TOP_K, ESSAY_TOP_P, ESSAY_MAX_LEN = 1.0, 0, 0.85, 200
# The largest max_len and seed: the integers every JSON client reads exactly (I-JSON, RFC 7493), so a schema's bound
# means the same to every client.
ESSAY_MAX_INT = 2**53 - 1

# Field names of the server's first API, and what they are called now (refused with this message).
RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_samples": "n", "stop_strings": "stop"}

_PROMPT_DOC = "Text, texts, token ids or lists of token ids; each prompt gets n choices."

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _integral(value: Any) -> Any:
    """A float with no fraction is the integer it equals: JSON Schema's "integer" (``30.0`` is 30)."""
    return int(value) if type(value) is float and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]  # an int field as JSON Schema reads "integer"


def json_int(**bounds: float) -> Any:
    """``JsonInt`` within ``bounds`` (the bounds first, so the schema states them as minimum/maximum)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]

# One of ``prompt`` or ``title`` (``context`` goes with ``title``): stated in the schema, checked in the model.
_RULES = {
    "oneOf": [
        {"required": ["prompt"], "not": {"anyOf": [{"required": ["title"]}, {"required": ["context"]}]}},
        {"required": ["title"], "not": {"required": ["prompt"]}},
    ],
}


def clean_field(value: str, field_name: str) -> str:
    """The project's one text policy (``cpm_infer.text``): lone surrogates (a cut UTF-16 string, a buggy
    JSON producer) become U+FFFD, with a warning naming the field; a pair sent as two escapes is joined."""
    return policy_clean_field(value, field_name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_SCALARS = {"int": JsonInt, "float": float, "bool": bool}


def _ids_field(setting: Setting, token: Any) -> tuple[Any, Any]:
    """A list-of-token-ids setting as a request field, each id of type ``token``."""
    return Annotated[list[token], Field(max_length=setting.max_items)], Field(
        default_factory=list, description=_description(setting)
    )


def _description(setting: Setting) -> str:
    note = "; ".join(filter(None, [setting.off, setting.api_note]))
    return setting.help.rstrip(".") + (f" ({note})." if note else ".")


def _api_field(setting: Setting) -> tuple[Any, Any]:
    """A generation setting as a request field: its type with the API's range, its default, its help."""
    description = _description(setting)
    default = setting.request_default
    if setting.kind in _SCALARS:
        bounds = (setting.api_range or setting.range).pydantic()
        if setting.kind == "int":
            kind: Any = json_int(**bounds)
        else:
            kind = Annotated[_SCALARS[setting.kind], Field(**bounds)] if bounds else _SCALARS[setting.kind]
        if setting.api_nullable or setting.optional or default is None:
            kind = kind | None
        return kind, Field(default, description=description)
    if setting.kind == "ids":  # the vocabulary's upper bound: completion_request_model()
        return _ids_field(setting, json_int(ge=0))
    if setting.kind == "strings":
        return Stop | Annotated[list[Stop], Field(max_length=setting.max_items)] | None, Field(
            None, description=description
        )
    bias = Annotated[dict[TokenKey, Bias], Field(max_length=setting.max_items)]
    return bias | None, Field(None, description=description + " Keys are token ids (strings), as OpenAI's.")


# The generation settings the server takes (cpm_infer.settings), under their API names.
_GenerationFields: type[BaseModel] = create_model(
    "GenerationFields",
    __config__=_STRICT,
    __module__=__name__,
    **{s.api_name: _api_field(s) for s in for_door("serve")},
)


class CompletionRequest(_GenerationFields):
    """POST /v1/completions: OpenAI's fields and CPM's extras. The generation settings come from
    ``cpm_infer.settings`` (defaults: the server's sampling defaults); these are the request's own."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=_RULES)

    model: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None, description="The served model's id (GET /v1/models); omitted = the served model."
    )
    # Overridden by completion_request_model() with the vocabulary's range for token ids.
    prompt: str | list[str] | list[int] | list[list[int]] = Field(None, description=_PROMPT_DOC)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    user: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None
    best_of: json_int(ge=1, le=1) | None = Field(None, description="Only null or 1 (no reranking).")
    suffix: None = Field(None, description="Not supported: null only.")
    # CPM extras
    title: str = Field(None, description="Essay prompt `title <sep> context` (instead of `prompt`).")
    context: str = Field(None, description="The essay's beginning (with `title`).")
    truncate: bool = Field(False, description="Keep a too-long prompt's last tokens instead of answering 400.")
    speculative: bool = Field(
        True,
        description="Decode speculatively where the server has a draft (--draft; while one sequence runs): "
        "false opts this request out. The output is the same either way (greedy: token for token; sampled: in "
        "distribution).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED.items():
                if old in data:
                    raise ValueError(f'"{old}" is now called "{new}"')
        return data

    @field_validator("model", "prompt", "stop", "user", "title", "context")
    @classmethod
    def _clean_text(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            return clean_field(value, info.field_name)
        if isinstance(value, list):
            return [clean_field(v, info.field_name) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if (self.prompt is None) == (self.title is None):
            raise ValueError('give exactly one of "prompt" or "title" (with an optional "context")')
        if self.context is not None and self.title is None:
            raise ValueError('"context" goes with "title"')
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise ValueError("prompt: a list of prompts needs at least one, and no empty token list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: texts or token-id lists (a title request has none)."""
        p = self.prompt
        if p is None:
            return []
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # one prompt of token ids
        return list(p)


def completion_request_model(settings: ServeSettings, vocab_size: int) -> type[CompletionRequest]:
    """The request model with this server's limits in it (so in its OpenAPI schema)."""
    cap, samples = settings.max_new_tokens_cap, settings.max_samples
    token = json_int(ge=0, lt=vocab_size)
    ids = Annotated[list[token], Field(min_length=1)]
    texts = Annotated[list[str], Field(min_length=1, max_length=samples)]
    ids_lists = Annotated[list[ids], Field(min_length=1, max_length=samples)]

    max_default = min(settings.default_max_new_tokens, cap)
    return create_model(  # named so in the OpenAPI schema
        "CompletionRequest",
        __base__=CompletionRequest,
        __module__=__name__,
        prompt=(str | texts | ids | ids_lists, Field(None, description=_PROMPT_DOC)),
        max_tokens=(
            json_int(ge=0, le=cap) | None,
            Field(
                None,
                description=f"New tokens per choice; omitted = {max_default}; 0: none (with echo: the prompt scored).",
            ),
        ),
        min_tokens=(
            json_int(ge=0, le=cap),
            Field(0, description="Tokens to generate before <eod> may end a choice (more than max_tokens: cut to it)."),
        ),
        n=(
            json_int(ge=1, le=samples) | None,
            Field(1, description=f"Choices per prompt; prompts x n is at most {samples}."),
        ),
        **{s.api_name: _ids_field(s, token) for s in for_door("serve") if s.kind == "ids"},
        logit_bias=(
            Annotated[dict[TokenKey, Bias], Field(max_length=300), AfterValidator(_in_vocabulary(vocab_size))] | None,
            Field(None, description=CompletionRequest.model_fields["logit_bias"].description),
        ),
    )


def _in_vocabulary(vocab_size: int) -> Any:
    def check(bias: dict[str, float]) -> dict[str, float]:
        outside = [key for key in bias if int(key) >= vocab_size]
        if outside:
            raise ValueError(f"token id(s) {', '.join(outside[:5])} outside the vocabulary (0..{vocab_size - 1})")
        return bias

    return check


class EssayRequest(BaseModel):
    """POST /zuowen, as the seed service took it: extra keys ignored, numbers as JSON has them (``30.0`` is the
    integer 30, as JSON Schema says), never as strings or booleans (``false`` is no seed)."""

    model_config = ConfigDict(extra="ignore")

    title: str
    context: str = ""
    max_len: int = Field(
        ESSAY_MAX_LEN, ge=1, le=ESSAY_MAX_INT, description="Title + context + new tokens (new ones are capped)."
    )
    seed: Annotated[int, Field(ge=0, le=ESSAY_MAX_INT)] | None = Field(
        None, description="Same seed, title and context = same essay; omitted = a fresh random seed."
    )

    @field_validator("title", "context")
    @classmethod
    def _clean_text(cls, value: str, info: Any) -> str:
        return clean_field(value, info.field_name)

    @field_validator("max_len", "seed", mode="before")
    @classmethod
    def _json_number(cls, value: Any, info: Any) -> Any:
        if isinstance(value, bool | str):
            raise ValueError(f"{info.field_name} must be a JSON integer, got {value!r}")
        return value


def essay_ids(tokenizer: CpmTokenizer, title: str, context: str, n_positions: int) -> list[int]:
    """``title <sep> context`` as token ids, refused when it leaves no room to generate."""
    ids = essay_prompt(tokenizer, title, context)
    if len(ids) >= n_positions:
        raise PromptTooLongError(
            f"title and context have {len(ids)} tokens but the model's context is {n_positions}; shorten them"
        )
    return ids


def essay_config(max_len: int, prompt_len: int, seed: int | None, settings: ServeSettings) -> GenerationConfig:
    """The seed's ``max_len`` counts title + context + new tokens; new tokens are capped, not refused,
    so its clients keep getting answers (the seed went on to the next punctuation mark instead)."""
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    max_new = min(max(max_len - prompt_len, 1), settings.max_new_tokens_cap)
    return GenerationConfig(
        max_new_tokens=max_new, temperature=ESSAY_TEMPERATURE, top_k=ESSAY_TOP_K, top_p=ESSAY_TOP_P, seed=seed
    )
