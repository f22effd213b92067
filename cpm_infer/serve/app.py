"""The FastAPI app: OpenAI's Completions API (``/v1/completions``, ``/v1/models``), the seed's ``/zuowen`` essay
route, ``/health``, ``/info`` and Prometheus ``/metrics``. Handlers never run the model: they tokenize in a
thread pool, submit a job and await its events, so the event loop stays free for other clients.

``create_app`` holds no global state: each app has its own scheduler, metrics registry and limits, so several
apps (replicas) can live in one process or be built in another one."""

# No ``from __future__ import annotations`` here: FastAPI reads the per-app request model from the
# handler's annotation, which must be the class itself, not a string naming a local variable.

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cpm_infer import __version__
from cpm_infer.backends.base import Backend
from cpm_infer.engine import max_prompt_tokens
from cpm_infer.serve import docs, schemas
from cpm_infer.serve.auth import require_api_key
from cpm_infer.serve.completions import Answer, collect, encode_prompts, request_config, stream
from cpm_infer.serve.errors import ClientGoneError, ModelNotFoundError, RequestTimeoutError
from cpm_infer.serve.jobs import DISCONNECTED, TIMEOUT, Job
from cpm_infer.serve.metrics import RequestCounter, ServeMetrics
from cpm_infer.serve.scheduler import Scheduler
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.serve.web import BodyLimitMiddleware, EventStreamResponse, install_error_handlers
from cpm_infer.tokenizer import CpmTokenizer


def create_app(
    backend: Backend,
    tokenizer: CpmTokenizer,
    settings: ServeSettings | None = None,
    *,
    model_name: str = "cpm",
    model_info: dict[str, Any] | None = None,
    warmup: bool = True,
    api_key: str | None = None,
    owns_backend: bool = False,
) -> FastAPI:
    """An app serving ``backend``; its generation thread lives as long as the app's lifespan.

    ``api_key``: every route but ``/health`` (and the schema pages) then needs ``Authorization: Bearer KEY``.
    ``owns_backend``: the shutdown also closes the backend (``Backend.close``) once generation has stopped.
    """
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    scheduler = Scheduler(backend, tokenizer, settings, metrics, owns_backend=owns_backend)
    metrics.watch(lambda: scheduler.snapshot()["queued"], lambda: scheduler.snapshot()["running_rows"])
    n_positions = backend.spec.n_positions
    max_prompt = max_prompt_tokens(backend)  # less than the context on a TensorRT engine (--max-input)
    created = int(time.time())
    completion_request = schemas.completion_request_model(settings, tokenizer.vocab_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(tokenizer.encode, "预热")  # jieba loads its dictionary on first use
        if warmup:
            await run_in_threadpool(scheduler.warmup)
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="cpm-infer", version=__version__, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    paths = {"/health", "/info", "/metrics", "/v1/models", "/v1/completions", "/zuowen"}
    app.add_middleware(RequestCounter, metrics=metrics, routes=lambda: paths)
    install_error_handlers(app)
    docs.honest_openapi(app)

    protected = [Depends(require_api_key(api_key))] if api_key else []
    router = APIRouter(dependencies=protected)
    errors = docs.error_responses(auth=bool(api_key))

    @app.get("/health", responses={503: {"description": "shutting down, or the generation thread has stopped"}})
    async def health() -> JSONResponse:
        state = scheduler.snapshot()
        status = "shutting_down" if state["closing"] else "ok" if scheduler.alive else "generation_stopped"
        return JSONResponse({"status": status, **state}, status_code=200 if status == "ok" else 503)

    @router.get("/info", responses=errors.only(401))
    async def info() -> dict[str, Any]:
        return {
            "model": model_name,
            "backend": backend.name,
            "spec": backend.spec.to_dict(),
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "limits": settings.to_dict(),
            "version": __version__,
            **(model_info or {}),
        }

    def card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "cpm-infer",
            "context_length": n_positions,
        }

    @router.get("/v1/models", responses=errors.only(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @router.get("/v1/models/{model}", responses=errors.only(401, 404))
    async def model(model: str) -> dict[str, Any]:
        check_model(model, model_name)
        return card()

    @router.post("/v1/completions", response_model=None, responses=docs.completion_responses(errors))
    async def completions(body: completion_request, request: Request) -> Response:
        arrived = time.monotonic()
        check_model(body.model, model_name)
        config = request_config(body, settings)
        prompts = await run_in_threadpool(
            encode_prompts, tokenizer, body, n_positions, config.max_new_tokens, max_prompt
        )
        job = scheduler.submit([p.ids for p in prompts], config, stream=bool(body.stream))
        metrics.prompt(job.prompt_tokens)
        answer = Answer(
            id=f"cmpl-{uuid.uuid4().hex[:24]}",
            model=model_name,
            prompts=prompts,
            n=config.num_samples,
            echo=bool(body.echo),
            logprobs=body.logprobs is not None,
            arrived=arrived,
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream(job, answer, include_usage, scheduler.cancel)
            return EventStreamResponse(events, on_close=lambda: scheduler.cancel(job, DISCONNECTED))
        results = await _wait(job, scheduler, request)
        return JSONResponse(answer.body(job, results))

    async def essay(request: Request, title: str, context: str, max_len: int, seed: int | None) -> dict[str, str]:
        title = schemas.clean_field(title, "title")
        context = schemas.clean_field(context, "context")

        def encode() -> tuple[list[int], int]:
            ids = schemas.essay_ids(tokenizer, title, context, min(n_positions, max_prompt + 1))
            return ids, len(tokenizer.encode(title)) + 1  # where the context starts (after <sep>)

        ids, context_start = await run_in_threadpool(encode)
        config = schemas.essay_config(max_len, len(ids), seed, settings)
        results = await _wait(scheduler.submit([ids], config), scheduler, request)
        # As the seed service: the context the client gave, continued (decoded together, as the seed did).
        content = tokenizer.decode(ids[context_start:] + results[0].token_ids)
        return {"title": title, "content": content}

    @router.get("/zuowen", responses=errors.only(400, 401, 503, 504, 500))
    async def essay_get(
        request: Request,
        title: str,
        context: str = "",
        max_len: int = Query(schemas.ESSAY_MAX_LEN),
        seed: int | None = None,
    ) -> dict[str, str]:
        return await essay(request, title, context, max_len, seed)

    @router.post("/zuowen", responses=errors.only(400, 401, 413, 503, 504, 500))
    async def essay_post(body: schemas.EssayRequest, request: Request) -> dict[str, str]:
        return await essay(request, body.title, body.context, body.max_len, body.seed)

    @router.get("/metrics", responses={**errors.only(401), 200: docs.METRICS_200})
    async def prometheus() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    app.include_router(router)
    return app


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFoundError(
            f"the model '{requested}' does not exist on this server; it serves '{served}' (GET /v1/models)",
            param="model",
        )


async def _wait(job: Job, scheduler: Scheduler, request: Request) -> list[Any]:
    """A non-streaming job's results. A client that disconnects, or a request past its deadline, is
    cancelled so that it stops taking a place in the queue or a row of the running batch."""
    result = asyncio.ensure_future(collect(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            scheduler.cancel(job, DISCONNECTED)
            raise ClientGoneError("the client disconnected")  # nobody reads this answer
        return result.result()
    except RequestTimeoutError:
        scheduler.cancel(job, TIMEOUT)
        raise
    except asyncio.CancelledError:  # the server gave up on this handler (forced shutdown)
        scheduler.cancel(job, DISCONNECTED)
        raise
    finally:
        gone.cancel()
        result.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
