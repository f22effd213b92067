"""The FastAPI app: OpenAI's Completions API (``/v1/completions``, ``/v1/models``), the seed's ``/zuowen`` essay
route, ``/tokenize`` and ``/detokenize``, ``/health``, ``/info``, Prometheus ``/metrics`` and a page to try the
model at ``/`` (the route groups are in ``cpm_infer.serve.routes``).

``create_app`` holds no global state: each app has its own scheduler, metrics registry and limits, so several
apps (replicas) can live in one process or be built in another one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import APIRouter, Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from cpm_infer import __version__
from cpm_infer.backends.base import Backend
from cpm_infer.engine import max_prompt_tokens
from cpm_infer.serve import docs
from cpm_infer.serve.auth import require_api_key
from cpm_infer.serve.metrics import RequestCounter, ServeMetrics
from cpm_infer.serve.replicas import ReplicaConfig
from cpm_infer.serve.routes import Served, completions, essay, models, ops, page, tokens
from cpm_infer.serve.scheduler import Scheduler
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.serve.web import BodyLimitMiddleware, install_error_handlers
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

    ``api_key``: every route but ``/health``, the page at ``/`` (and the schema pages) then needs
    ``Authorization: Bearer KEY``.
    ``owns_backend``: the shutdown also closes the backend (``Backend.close``) once generation has stopped.
    """
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    scheduler = Scheduler(backend, tokenizer, settings, metrics, owns_backend=owns_backend)
    metrics.watch(lambda: scheduler.snapshot()["queued"], lambda: scheduler.snapshot()["running_rows"])
    errors = docs.error_responses(auth=bool(api_key))
    max_prompt = max_prompt_tokens(backend)
    served = Served(backend, tokenizer, settings, scheduler, metrics, errors, model_name, model_info or {}, max_prompt)
    app = FastAPI(title="cpm-infer", version=__version__, lifespan=_lifespan(served, warmup))
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.metrics = metrics
    router = APIRouter(dependencies=[Depends(require_api_key(api_key))] if api_key else [])
    ops.add_health(app, served)
    page.add_page(app, served, key_required=bool(api_key))  # public too: its API calls carry the key
    ops.add_info(router, served)
    for group in (models, completions, essay):
        group.add_routes(router, served)
    ops.add_metrics(router, served)
    tokens.add_routes(router, served)
    app.include_router(router)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    paths = {"/health", *(route.path for route in router.routes if hasattr(route, "path"))}
    app.add_middleware(RequestCounter, metrics=metrics, routes=lambda: paths)  # outermost: counts every answer
    install_error_handlers(app)
    docs.honest_openapi(app)
    return app


def _lifespan(served: Served, warmup: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(served.tokenizer.encode, "预热")  # jieba loads its dictionary on first use
        if warmup:
            await run_in_threadpool(served.scheduler.warmup)
        served.scheduler.start()
        yield
        await run_in_threadpool(served.scheduler.close)

    return lifespan


class LoadedApp(NamedTuple):
    app: FastAPI
    backend: Backend
    load_s: float


def load_app(config: ReplicaConfig, *, threads: int | None = None, **info: Any) -> LoadedApp:
    """Load the model ``config`` names and build its app, which owns the backend (its shutdown closes it).
    ``threads``: when the config gives none. ``/info`` shows the model's path, ``info`` and the load time."""
    from cpm_infer.backends import load_backend

    start = time.perf_counter()
    c = config
    backend, tokenizer = load_backend(
        c.backend, c.model, device=c.device, tokenizer_file=c.tokenizer, threads=c.threads or threads
    )
    load_s = round(time.perf_counter() - start, 2)
    app = create_app(
        backend,
        tokenizer,
        config.settings,
        model_name=config.model_name or Path(config.model).resolve().name,
        model_info={"path": config.model, **info, "load_s": load_s},
        warmup=config.warmup,
        api_key=config.api_key,
        owns_backend=True,
    )
    return LoadedApp(app, backend, load_s)
