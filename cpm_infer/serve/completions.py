"""OpenAI's Completions API over a job: request -> (prompts, GenerationConfig), events -> answer or chunks.

Choice ``c`` of an answer is sample ``c % n`` of prompt ``c // n``. ``finish_reason`` is OpenAI's: "stop"
(end of text or a stop string) or "length" (``max_tokens`` or the model's context). ``usage`` counts each
prompt once and every choice's tokens. Beyond OpenAI's fields an answer carries ``timings`` (milliseconds).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpm_infer.backends.base import Scorer
from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine.chooser import TokenLogprob, raw_logprobs
from cpm_infer.engine.generate import GenerationResult
from cpm_infer.eval.logprobs import all_logits
from cpm_infer.prompts import Prompt, PromptLimits, prepare
from cpm_infer.serve.errors import InvalidRequestError, RequestTimeoutError, ServeError
from cpm_infer.serve.jobs import TIMEOUT, ChoiceDone, ErrorEvent, Job, TokenEvent
from cpm_infer.serve.schemas import CompletionRequest
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.serve.web import sse
from cpm_infer.settings import Setting, for_door
from cpm_infer.tokenizer import CpmTokenizer

KEEPALIVE_S = 15.0  # an SSE comment this often while a streamed request waits (keeps proxies from timing out)


def request_config(req: CompletionRequest, settings: ServeSettings) -> GenerationConfig:
    """The request's GenerationConfig (ConfigError -> 400); null means the default, as in OpenAI's API."""
    n = req.n or 1
    if len(req.prompts() or [0]) * n > settings.max_samples:
        raise InvalidRequestError(
            f"{len(req.prompts())} prompts x n={n} choices is over this server's cap of {settings.max_samples}",
            param="n",
        )
    values = {s.name: _config_value(s, getattr(req, s.api_name)) for s in for_door("serve")}
    values["max_new_tokens"] = req.max_tokens or min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    values["min_new_tokens"] = min(values["min_new_tokens"], values["max_new_tokens"])  # documented: cut, not refused
    try:
        return GenerationConfig(**values)
    except ConfigError as exc:  # name the request's fields, not the library's
        message = str(exc)
        for setting in for_door("serve"):
            message = message.replace(setting.name, setting.api_name)
        raise InvalidRequestError(message, param=message.split()[0]) from exc


def _config_value(setting: Setting, value: Any) -> Any:
    """A request field's value as the config takes it (null: the declared default)."""
    if value is None:
        return None if setting.optional else setting.default
    if setting.kind == "strings" and isinstance(value, str):
        return (value,)
    if setting.kind == "bias":
        return tuple((int(token), bias) for token, bias in value.items())
    return value


SERVE_HINT = 'send "truncate": true'


def encode_prompts(
    tokenizer: CpmTokenizer,
    req: CompletionRequest,
    n_positions: int,
    max_new_tokens: int,
    max_prompt: int | None = None,
) -> list[Prompt]:
    """Token ids of each prompt (``cpm_infer.prompts``), refused (400) or truncated (``truncate``) when it
    leaves no room to generate or is longer than the backend prefills (``max_prompt``: a TensorRT engine's
    --max-input)."""
    limits = PromptLimits(n_positions, min(n_positions - 1, max_prompt or n_positions))
    requests: list[Any] = [{"title": req.title, "context": req.context}] if req.title is not None else req.prompts()
    return [
        prepare(
            tokenizer,
            request,
            limits,
            max_new_tokens=max_new_tokens,
            truncate=req.truncate,
            which=f"prompt {i}" if len(requests) > 1 else "the prompt",
            hint=SERVE_HINT,
        )
        for i, request in enumerate(requests)
    ]


def finish_reason(reason: str) -> str:
    return "length" if reason in ("length", "context") else "stop"


def usage(prompt_tokens: int, results: list[GenerationResult]) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` (the prompt tokens reused from the prefix cache, each
    prompt counted once like ``prompt_tokens``) when there are any."""
    completion = sum(len(r.token_ids) for r in results)
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    cached = sum(getattr(r, "cached_tokens", 0) for r in results if r.sample_index == 0)
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


def logprobs_block(steps: list[Any], start_offset: int) -> dict[str, list[Any]]:
    """OpenAI's legacy logprobs object for ``steps`` (the engine's TokenLogprob per generated token):
    ``text_offset`` is each token's character offset in the answer's text (which starts at ``start_offset``)."""
    block: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for step in steps:
        block["tokens"].append(step.token_text)
        block["text_offset"].append(offset)
        offset += len(step.token_text)
        if step.logprob is None:  # a prompt's first token: nothing before it to predict it (as OpenAI's)
            block["token_logprobs"].append(None)
            block["top_logprobs"].append(None)
            continue
        block["token_logprobs"].append(float(step.logprob))
        top = {text: float(lp) for _, text, lp in step.top}
        top.setdefault(step.token_text, float(step.logprob))  # the chosen token is always in (as OpenAI's)
        block["top_logprobs"].append(top)
    return block


def joined(first: dict[str, list[Any]], second: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: first[key] + second[key] for key in first}


def score_prompts(backend: Any, tokenizer: CpmTokenizer, prompts: list[Prompt], n: int) -> list[list[TokenLogprob]]:
    """Each prompt's tokens with their log-probability given the tokens before them and the ``n`` most likely
    alternatives (the first token has none): OpenAI's ``echo`` with ``logprobs``. One pass over the prompt on a
    backend that scores (``Scorer``: stateless, so it runs beside the generation thread)."""
    if not isinstance(backend, Scorer):
        raise InvalidRequestError(
            f"echo with logprobs needs a backend that scores a prompt in one pass (torch, ort), not {backend.name}",
            param="echo",
        )
    decode = tokenizer.decode
    scored = []
    for prompt in prompts:
        if not prompt.ids:
            scored.append([])
            continue
        ids = np.asarray([prompt.ids], dtype=np.int64)
        logits = all_logits(backend, ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None])[0]
        steps = [TokenLogprob(prompt.ids[0], decode(prompt.ids[:1]), None)]
        for t in range(1, len(prompt.ids)):
            logprob, top = raw_logprobs(logits[t - 1], prompt.ids[t], n)
            alternatives = [(i, decode([i]), v) for i, v in top]
            steps.append(TokenLogprob(prompt.ids[t], decode(prompt.ids[t : t + 1]), logprob, alternatives))
        scored.append(steps)
    return scored


@dataclass
class Answer:
    """What a completion request needs besides its job to format its answer."""

    id: str
    model: str
    prompts: list[Prompt]
    n: int
    echo: bool
    logprobs: bool
    arrived: float
    scored: list[list[TokenLogprob]] | None = None  # each prompt's tokens with logprobs (echo with logprobs)
    created: int = field(default_factory=lambda: int(time.time()))

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def echoed(self, choice: int) -> str:
        return self.prompts[choice // self.n].text if self.echo else ""

    def echoed_logprobs(self, choice: int) -> dict[str, list[Any]]:
        """The logprobs block of the echoed prompt (empty without echo)."""
        return logprobs_block(self.scored[choice // self.n] if self.echo and self.scored else [], 0)

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        prefix = self.echoed(index)
        steps = getattr(result, "logprobs", None) or []
        logprobs = joined(self.echoed_logprobs(index), logprobs_block(steps, len(prefix))) if self.logprobs else None
        return {
            "index": index,
            "text": prefix + result.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(result.finish_reason),
        }

    def prompt_only(self) -> dict[str, Any]:
        """``max_tokens`` 0: nothing is generated; with ``echo`` each choice is its prompt (scored when ``logprobs``
        asked for), without it an empty text."""
        choices = [
            {
                "index": c,
                "text": self.echoed(c),
                "logprobs": self.echoed_logprobs(c) if self.logprobs else None,
                "finish_reason": "length",
            }
            for c in range(len(self.prompts) * self.n)
        ]
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
        return {**self.meta(), "choices": choices, "usage": usage}

    async def prompt_only_stream(self) -> AsyncIterator[str]:
        body = self.prompt_only()
        for choice in body["choices"]:
            yield sse({**self.meta(), "choices": [{**choice, "finish_reason": None}]})
        for choice in body["choices"]:
            done = {"index": choice["index"], "text": "", "logprobs": None, "finish_reason": "length"}
            yield sse({**self.meta(), "choices": [done], "usage": body["usage"]})
        yield sse("[DONE]")

    def body(self, job: Job, results: list[GenerationResult]) -> dict[str, Any]:
        return {
            **self.meta(),
            "choices": [self.choice(i, r) for i, r in enumerate(results)],
            "usage": usage(job.prompt_tokens, results),
            "timings": timings(job, self.arrived),
        }


def timings(job: Job, arrived: float) -> dict[str, float | int]:
    now = time.monotonic()

    def ms(t: float | None) -> float:
        return round(1000 * ((t or now) - arrived), 2)

    return {
        "queue_ms": ms(job.started),
        "first_token_ms": ms(job.first_token),
        "total_ms": ms(now),
        "batch_rows": job.batch_rows,
    }


async def collect(job: Job) -> list[GenerationResult]:
    """Every choice's result of a non-streaming job (raises the job's error)."""
    results: dict[int, GenerationResult] = {}
    while len(results) < job.rows:
        event = await job.next_event()
        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, ChoiceDone):
            results[event.choice] = event.result
    return [results[i] for i in range(job.rows)]


async def stream(
    job: Job, answer: Answer, include_usage: bool, cancel: Callable[[Job, str], object]
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per piece of text (with the echoed prompt first), a
    chunk with each choice's finish_reason, then (``include_usage``) a chunk with no choices and the usage,
    then ``data: [DONE]``. Without ``include_usage`` the last choice chunk carries the usage. An error after
    the headers went out arrives as an ``{"error": ...}`` event."""
    meta = answer.meta()
    extra = {"usage": None} if include_usage else {}
    offsets = [len(answer.echoed(c)) for c in range(job.rows)]  # each choice's tokens so far, for text_offset

    def chunk(index: int, text: str, steps: list[Any]) -> str:
        logprobs = logprobs_block(steps, offsets[index]) if answer.logprobs else None
        offsets[index] += sum(len(step.token_text) for step in steps)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return sse({**meta, "choices": [choice], **extra})

    if answer.echo:
        for c in range(job.rows):
            logprobs = answer.echoed_logprobs(c) if answer.logprobs else None
            choice = {"index": c, "text": answer.echoed(c), "logprobs": logprobs, "finish_reason": None}
            yield sse({**meta, "choices": [choice], **extra})
    results: dict[int, GenerationResult] = {}
    while len(results) < job.rows:
        try:
            event = await job.next_event(idle_s=KEEPALIVE_S)
        except RequestTimeoutError as exc:
            cancel(job, TIMEOUT)
            yield sse(exc.body())
            return
        if event is None:
            yield ": keep-alive\n\n"
        elif isinstance(event, TokenEvent):
            steps = [event.logprob] if event.logprob is not None else []
            if event.text or steps:
                yield chunk(event.choice, event.text, steps)
        elif isinstance(event, ErrorEvent):
            error: ServeError = event.error
            yield sse(error.body())
            return
        else:
            results[event.choice] = event.result
            last = len(results) == job.rows
            done = {"index": event.choice, "text": "", "logprobs": None}
            done["finish_reason"] = finish_reason(event.result.finish_reason)
            body: dict[str, Any] = {**meta, "choices": [done], **extra}
            if last and not include_usage:
                body["usage"] = usage(job.prompt_tokens, list(results.values()))
            yield sse(body)
    if include_usage:
        yield sse({**meta, "choices": [], "usage": usage(job.prompt_tokens, list(results.values()))})
    yield sse("[DONE]")
