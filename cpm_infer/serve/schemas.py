"""Request and response shapes of the HTTP API.

Pydantic checks types (strictly: ``"0.5"`` is not a number) and unknown fields; the *values* of the
sampling settings are validated by ``GenerationConfig`` itself, so the server and the CLI accept
exactly the same settings and say the same thing about bad ones.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.generate import GenerationResult, PromptTooLongError, truncate_prompt
from cpm_infer.prompts import essay_prompt, plain_prompt
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.tokenizer import CpmTokenizer

_DEFAULT = GenerationConfig()

# The seed service's (yangjianxin1/CPM http_service.py) sampling defaults for /zuowen.
ESSAY_TEMPERATURE, ESSAY_TOP_K, ESSAY_TOP_P, ESSAY_MAX_LEN = 1.0, 0, 0.85, 200


class CompletionRequest(BaseModel):
    """POST /v1/completions: a prompt (or an essay title + context) and sampling settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    title: str | None = None
    context: str | None = None
    max_new_tokens: int | None = None  # default: the server's default, never above its cap
    min_new_tokens: int = _DEFAULT.min_new_tokens
    temperature: float = _DEFAULT.temperature
    top_k: int = _DEFAULT.top_k
    top_p: float = _DEFAULT.top_p
    repetition_penalty: float = _DEFAULT.repetition_penalty
    ban_unk: bool = _DEFAULT.ban_unk
    banned_ids: list[int] = []
    stop: str | list[str] | None = None
    seed: int | None = _DEFAULT.seed  # null: a fresh random seed per request
    num_samples: int = _DEFAULT.num_samples
    ignore_eos: bool = _DEFAULT.ignore_eos
    truncate: bool = False  # keep the last tokens of a prompt that does not fit the context
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if (self.prompt is None) == (self.title is None):
            raise ValueError('give exactly one of "prompt" or "title" (with an optional "context")')
        if self.context is not None and self.title is None:
            raise ValueError('"context" goes with "title"')
        return self


class EssayRequest(BaseModel):
    """POST /zuowen, as the seed service took it (lenient types, extra keys ignored)."""

    model_config = ConfigDict(extra="ignore")

    title: str
    context: str = ""
    max_len: int = ESSAY_MAX_LEN
    seed: int | None = None


def completion_config(req: CompletionRequest, settings: ServeSettings) -> GenerationConfig:
    """The request's GenerationConfig, within the server's limits (ConfigError -> 422)."""
    max_new = req.max_new_tokens
    if max_new is None:
        max_new = min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    if max_new > settings.max_new_tokens_cap:
        raise ConfigError(f"max_new_tokens {max_new} is over this server's cap of {settings.max_new_tokens_cap}")
    if req.num_samples > settings.max_samples:
        raise ConfigError(f"num_samples {req.num_samples} is over this server's cap of {settings.max_samples}")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return GenerationConfig(
        max_new_tokens=max_new,
        min_new_tokens=req.min_new_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        ban_unk=req.ban_unk,
        banned_ids=tuple(req.banned_ids),
        stop_strings=stop,
        seed=req.seed,
        num_samples=req.num_samples,
        ignore_eos=req.ignore_eos,
    )


def essay_config(max_len: int, prompt_len: int, seed: int | None, settings: ServeSettings) -> GenerationConfig:
    """The seed's ``max_len`` counts title + context + new tokens; new tokens are capped, not refused,
    so its clients keep getting answers (the seed went on to the next punctuation mark instead)."""
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    max_new = min(max(max_len - prompt_len, 1), settings.max_new_tokens_cap)
    return GenerationConfig(
        max_new_tokens=max_new, temperature=ESSAY_TEMPERATURE, top_k=ESSAY_TOP_K, top_p=ESSAY_TOP_P, seed=seed
    )


def encode_prompt(
    tokenizer: CpmTokenizer,
    *,
    prompt: str | None = None,
    title: str | None = None,
    context: str = "",
    n_positions: int,
    max_new_tokens: int,
    truncate: bool = False,
) -> list[int]:
    """Token ids of a plain or essay prompt, refused (or truncated) when it leaves no room to generate."""
    ids = essay_prompt(tokenizer, title, context) if title is not None else plain_prompt(tokenizer, prompt or "")
    if truncate:
        ids = truncate_prompt(ids, n_positions, max_new_tokens)
    if len(ids) >= n_positions:
        raise PromptTooLongError(
            f"the prompt has {len(ids)} tokens but the model's context is {n_positions}; "
            f'shorten it or send "truncate": true'
        )
    return ids


def usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt_tokens = results[0].prompt_tokens if results else 0
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_body(
    *, request_id: str, created: int, model: str, results: list[GenerationResult], timings: dict[str, Any]
) -> dict[str, Any]:
    """The JSON answer of a non-streaming completion."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": r.sample_index,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "completion_tokens": len(r.token_ids),
            }
            for r in results
        ],
        "usage": usage(results),
        "timings": timings,
    }
