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
from cpm_infer.config import ConfigError
from cpm_infer.engine import max_prompt_tokens
from cpm_infer.engine.speculative import NGRAM, Draft, open_draft, require_verifier
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
    draft: Draft | None = None,
) -> FastAPI:
    """An app serving ``backend``; its generation thread lives as long as the app's lifespan.

    ``api_key``: every route but ``/health``, the page at ``/`` (and the schema pages) then needs
    ``Authorization: Bearer KEY``.
    ``owns_backend``: the shutdown also closes the backend (``Backend.close``) once generation has stopped.
    ``draft``: the speculative decoding draft for ``settings.draft``, opened already (``load_app`` opens it on the
    model's device); None with ``settings.draft`` set: opened here (``open_server_draft``). The app owns it: the
    shutdown closes it.
    """
    settings = settings or ServeSettings()
    if draft is None and settings.draft is not None:
        draft = open_server_draft(settings.draft, backend, tokenizer)
    metrics = ServeMetrics()
    try:
        scheduler = Scheduler(backend, tokenizer, settings, metrics, owns_backend=owns_backend, draft=draft)
    except BaseException:
        if draft is not None:
            draft.close()
        raise
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
    draft: Draft | None = None  # the speculative decoding draft (--draft), closed with the app


def check_draft_path(spec: str) -> None:
    """A ``--draft`` that is neither ``ngram`` nor an existing path: a one-line ``ConfigError`` (checked before any
    model loads)."""
    if spec != NGRAM and not Path(spec).exists():
        raise ConfigError(f"draft model not found: {spec} (--draft takes a model directory or '{NGRAM}')")


def open_server_draft(
    spec: str, backend: Backend, tokenizer: CpmTokenizer, *, device: str = "auto", threads: int | None = None
) -> Draft:
    """The draft ``--draft`` names (``ngram`` or a model directory, opened on ``device`` with ``threads``), or a
    one-line ``ConfigError``: a missing path, a draft with another vocabulary, a target that cannot verify several
    tokens in one pass (TensorRT)."""
    require_verifier(backend)
    check_draft_path(spec)
    return open_draft(spec if spec == NGRAM else Path(spec), backend, tokenizer, device=device, threads=threads)


def load_app(config: ReplicaConfig, *, threads: int | None = None, **info: Any) -> LoadedApp:
    """Load the model ``config`` names and build its app, which owns the backend (its shutdown closes it).
    ``threads``: when the config gives none. ``/info`` shows the model's path, ``info`` and the load time."""
    from cpm_infer.backends import load_backend

    start = time.perf_counter()
    c = config
    backend, tokenizer = load_backend(
        c.backend, c.model, device=c.device, tokenizer_file=c.tokenizer, threads=c.threads or threads
    )
    draft = None
    try:
        if c.settings.draft is not None:  # on the model's device, with its threads
            draft = open_server_draft(
                c.settings.draft, backend, tokenizer, device=c.device, threads=c.threads or threads
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
            draft=draft,
        )
    except BaseException:
        backend.close()
        if draft is not None:  # (closing it twice is harmless)
            draft.close()
        raise
    return LoadedApp(app, backend, load_s, draft)
