"""The FastAPI app: completions (JSON or server-sent events), the seed's ``/zuowen`` essay route,
health and model info. Handlers never run the model: they tokenize in a thread pool, submit to the
batcher and await its events, so the event loop stays free for other clients."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cpm_infer import __version__
from cpm_infer.backends.base import Backend
from cpm_infer.serve import schemas
from cpm_infer.serve.batcher import (
    DISCONNECTED,
    TIMEOUT,
    Batcher,
    ClientGoneError,
    DoneEvent,
    ErrorEvent,
    Job,
    RequestTimeoutError,
    TextEvent,
)
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.serve.web import BodyLimitMiddleware, EventStreamResponse, error_body, install_error_handlers, sse
from cpm_infer.tokenizer import CpmTokenizer

KEEPALIVE_S = 15.0  # an SSE comment this often while a streamed request waits (keeps proxies from timing out)


def create_app(
    backend: Backend,
    tokenizer: CpmTokenizer,
    settings: ServeSettings | None = None,
    *,
    model_name: str = "cpm",
    model_info: dict[str, Any] | None = None,
    warmup: bool = True,
) -> FastAPI:
    """An app serving ``backend``; the batcher's worker thread lives as long as the app's lifespan."""
    settings = settings or ServeSettings()
    batcher = Batcher(backend, tokenizer, settings)
    n_positions = backend.spec.n_positions

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(tokenizer.encode, "预热")  # jieba loads its dictionary on first use
        if warmup:
            await run_in_threadpool(batcher.warmup)
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="cpm-infer", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = batcher.snapshot()
        status = "shutting_down" if state["closing"] else "ok"
        return JSONResponse({"status": status, **state}, status_code=503 if state["closing"] else 200)

    @app.get("/info")
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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "owned_by": "cpm-infer", "context_length": n_positions}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        config = schemas.completion_config(body, settings)
        ids = await run_in_threadpool(
            lambda: schemas.encode_prompt(
                tokenizer,
                prompt=body.prompt,
                title=body.title,
                context=body.context or "",
                n_positions=n_positions,
                max_new_tokens=config.max_new_tokens,
                truncate=body.truncate,
            )
        )
        job = batcher.submit(ids, config, stream=body.stream)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if body.stream:
            events = _stream(job, batcher, meta, arrived)
            return EventStreamResponse(events, on_close=lambda: batcher.cancel(job, DISCONNECTED))
        done = await _wait(job, batcher, request)
        timings = _timings(job, done, arrived)
        answer = schemas.completion_body(
            request_id=meta["id"], created=meta["created"], model=model_name, results=done.results, timings=timings
        )
        return JSONResponse(answer)

    async def essay(request: Request, title: str, context: str, max_len: int, seed: int | None) -> dict[str, str]:
        def encode() -> tuple[list[int], int]:
            ids = schemas.encode_prompt(
                tokenizer, title=title, context=context, n_positions=n_positions, max_new_tokens=1
            )
            return ids, len(tokenizer.encode(title)) + 1  # where the context starts (after <sep>)

        ids, context_start = await run_in_threadpool(encode)
        config = schemas.essay_config(max_len, len(ids), seed, settings)
        done = await _wait(batcher.submit(ids, config), batcher, request)
        # As the seed service: the context the client gave, continued (decoded together, as the seed did).
        content = tokenizer.decode(ids[context_start:] + done.results[0].token_ids)
        return {"title": title, "content": content}

    @app.get("/zuowen")
    async def essay_get(
        request: Request,
        title: str,
        context: str = "",
        max_len: int = Query(schemas.ESSAY_MAX_LEN),
        seed: int | None = None,
    ) -> dict[str, str]:
        return await essay(request, title, context, max_len, seed)

    @app.post("/zuowen")
    async def essay_post(body: schemas.EssayRequest, request: Request) -> dict[str, str]:
        return await essay(request, body.title, body.context, body.max_len, body.seed)

    return app


async def _wait(job: Job, batcher: Batcher, request: Request) -> DoneEvent:
    """A non-streaming request's result. A client that disconnects, or a request past its deadline,
    is cancelled so that it stops taking a place in the queue or a row of the running batch."""
    result = asyncio.ensure_future(job.next_event())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            batcher.cancel(job, DISCONNECTED)
            raise ClientGoneError("the client disconnected")  # nobody reads this answer
        event = result.result()
    except RequestTimeoutError:
        batcher.cancel(job, TIMEOUT)
        raise
    except asyncio.CancelledError:  # the server gave up on this handler (forced shutdown)
        batcher.cancel(job, DISCONNECTED)
        raise
    finally:
        gone.cancel()
        result.cancel()
    if isinstance(event, ErrorEvent):
        raise event.error
    assert isinstance(event, DoneEvent)  # non-streaming jobs get no TextEvents
    return event


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(job: Job, batcher: Batcher, meta: dict[str, Any], arrived: float) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of final text, then one with the finish reasons, usage and
    timings, then ``[DONE]``. Errors after the headers went out arrive as ``{"error": ...}`` events."""
    chunk = {**meta, "object": "text_completion.chunk"}
    while True:
        try:
            event = await job.next_event(idle_s=KEEPALIVE_S)
        except RequestTimeoutError as exc:
            batcher.cancel(job, TIMEOUT)
            yield sse(error_body(exc.status, exc.kind, str(exc)))
            return
        if event is None:
            yield ": keep-alive\n\n"
        elif isinstance(event, TextEvent):
            yield sse({**chunk, "choices": [{"index": event.sample, "text": event.text, "finish_reason": None}]})
        elif isinstance(event, ErrorEvent):
            yield sse(error_body(event.error.status, event.error.kind, str(event.error)))
            return
        else:
            choices = [{"index": r.sample_index, "text": "", "finish_reason": r.finish_reason} for r in event.results]
            usage, timings = schemas.usage(event.results), _timings(job, event, arrived)
            yield sse({**chunk, "choices": choices, "usage": usage, "timings": timings})
            yield sse("[DONE]")
            return


def _timings(job: Job, done: DoneEvent, arrived: float) -> dict[str, float | int]:
    started = job.started or arrived
    finished = job.finished or time.monotonic()
    return {
        "queue_ms": round(1000 * (started - arrived), 2),
        "first_token_ms": round(1000 * (started + done.prefill_s - arrived), 2),
        "generation_ms": round(1000 * (finished - started), 2),
        "total_ms": round(1000 * (time.monotonic() - arrived), 2),
        "batch_size": done.batch_rows,
    }
