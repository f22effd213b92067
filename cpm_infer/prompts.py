"""One prompt preparation for every front door (``cpm generate``, ``cpm batch``, the server).

A prompt is plain text, an essay's ``title <sep> context`` (the format of yangjianxin1/CPM, training and
generation) or token ids. ``prepare`` applies the text policy (``cpm_infer.text``: lone surrogates become
U+FFFD, with a warning naming where), encodes, and fits the prompt to the backend's own limit
(``PromptLimits``: the context minus one new token, or less where the backend prefills less, e.g. a
TensorRT engine's ``--max-input``): with ``truncate`` it keeps the last tokens, otherwise it refuses with a
``PromptTooLongError`` whose last words say how to truncate at that front door.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpm_infer.engine.core import PromptTooLongError, max_prompt_tokens
from cpm_infer.text import clean
from cpm_infer.tokenizer import CpmTokenizer

CLI_HINT = "truncate it to its last tokens (--truncate)"


def plain_prompt(tokenizer: CpmTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def essay_prompt(tokenizer: CpmTokenizer, title: str, context: str = "") -> list[int]:
    """``title <sep> context``: the essay format of yangjianxin1/CPM (training and generation)."""
    return [*tokenizer.encode(title), tokenizer.sep_id, *tokenizer.encode(context)]


@dataclass(frozen=True)
class PromptLimits:
    """How long a prompt may be: ``max_prompt`` tokens (at most ``n_positions`` - 1)."""

    n_positions: int
    max_prompt: int

    @classmethod
    def of(cls, backend: Any) -> PromptLimits:
        return cls(backend.spec.n_positions, max_prompt_tokens(backend))

    @property
    def engine_bound(self) -> bool:
        """The backend prefills less than the context allows (a TensorRT engine's profile)."""
        return self.max_prompt < self.n_positions - 1


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the prompt as text (what ``echo`` shows)


def encode(tokenizer: CpmTokenizer, request: Mapping[str, Any] | str | Sequence[int], where: str = "prompt") -> Prompt:
    """A request's prompt: ``{"prompt": text}``, ``{"title": t, "context": c}``, text, or token ids."""
    if isinstance(request, Mapping):
        if request.get("title") is not None:
            title, context = clean(request["title"], f"{where} title"), clean(request.get("context") or "", where)
            ids = essay_prompt(tokenizer, title, context)
            return Prompt(ids, tokenizer.decode(ids))
        request = request["prompt"]
    if isinstance(request, str):
        text = clean(request, where)
        return Prompt(plain_prompt(tokenizer, text), text)
    ids = [int(i) for i in request]
    return Prompt(ids, tokenizer.decode(ids))


def fit(
    prompt: Prompt,
    limits: PromptLimits,
    *,
    max_new_tokens: int,
    truncate: bool,
    which: str = "the prompt",
    hint: str = CLI_HINT,
) -> Prompt:
    """``prompt`` cut to its last tokens (``truncate``: room for ``max_new_tokens`` where the context allows, and
    within the backend's limit), or refused when it is over the limit."""
    if truncate:
        keep = min(max(1, limits.n_positions - max_new_tokens), limits.max_prompt)
        prompt.ids = prompt.ids[-keep:]
    n = len(prompt.ids)
    if n >= limits.n_positions:
        raise PromptTooLongError(
            f"{which} has {n} tokens but the model's context is {limits.n_positions}: shorten it, or {hint}"
        )
    if n > limits.max_prompt:
        raise PromptTooLongError(
            f"{which} has {n} tokens but this engine takes prompts of at most {limits.max_prompt} "
            f"(its build's --max-input): shorten it, or {hint}"
        )
    return prompt


def prepare(
    tokenizer: CpmTokenizer,
    request: Mapping[str, Any] | str | Sequence[int],
    limits: PromptLimits,
    *,
    which: str = "the prompt",
    **fitting: Any,
) -> Prompt:
    """``encode`` then ``fit`` (``fitting``: its ``max_new_tokens``, ``truncate``, ``hint``): the prompt every
    front door generates from."""
    return fit(encode(tokenizer, request, which), limits, which=which, **fitting)
