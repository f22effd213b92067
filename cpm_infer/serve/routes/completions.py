"""OpenAI's ``/v1/completions``: prompts -> one job on the scheduler -> an answer, or server-sent events."""

# No ``from __future__ import annotations`` here: FastAPI reads the per-app request model from the
# handler's annotation, which must be the class itself, not a string naming a local variable.

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cpm_infer.serve import docs, schemas
from cpm_infer.serve.completions import Answer, encode_prompts, request_config, score_prompts, stream
from cpm_infer.serve.jobs import DISCONNECTED
from cpm_infer.serve.routes import Served
from cpm_infer.serve.web import EventStreamResponse


def add_routes(router: APIRouter, served: Served) -> None:
    settings, scheduler = served.settings, served.scheduler
    completion_request = schemas.completion_request_model(settings, served.tokenizer.vocab_size)

    @router.post("/v1/completions", response_model=None, responses=docs.completion_responses(served.errors))
    async def completions(body: completion_request, request: Request) -> Response:
        arrived = time.monotonic()
        served.check_model(body.model)
        config = request_config(body, settings)
        prompts = await run_in_threadpool(
            encode_prompts, served.tokenizer, body, served.n_positions, config.max_new_tokens, served.max_prompt
        )
        answer = Answer(
            id=f"cmpl-{uuid.uuid4().hex[:24]}",
            model=served.model_name,
            prompts=prompts,
            n=config.num_samples,
            echo=bool(body.echo),
            logprobs=body.logprobs is not None,
            arrived=arrived,
        )
        if body.echo and body.logprobs is not None:  # the prompt's own logprobs (scoring)
            answer.scored = await run_in_threadpool(
                score_prompts, served.backend, served.tokenizer, prompts, body.logprobs
            )
        if body.max_tokens == 0:
            if body.stream:
                return EventStreamResponse(answer.prompt_only_stream(), on_close=lambda: None)
            return JSONResponse(answer.prompt_only())
        job = scheduler.submit([p.ids for p in prompts], config, stream=bool(body.stream), speculate=body.speculative)
        served.metrics.prompt(job.prompt_tokens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream(job, answer, include_usage, scheduler.cancel)
            return EventStreamResponse(events, on_close=lambda: scheduler.cancel(job, DISCONNECTED))
        results = await served.results(job, request)
        return JSONResponse(answer.body(job, results))
