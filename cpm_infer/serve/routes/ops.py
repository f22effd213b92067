"""``/health`` (open to all: load balancers and Ray's health check call it), ``/info`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response

from cpm_infer import __version__
from cpm_infer.serve import docs
from cpm_infer.serve.routes import Served


def add_health(app: FastAPI, served: Served) -> None:
    """On the app itself, outside the router that checks the API key."""
    scheduler = served.scheduler

    @app.get("/health", responses={503: {"description": "shutting down, or the generation thread has stopped"}})
    async def health() -> JSONResponse:
        state = scheduler.snapshot()
        status = "shutting_down" if state["closing"] else "ok" if scheduler.alive else "generation_stopped"
        return JSONResponse({"status": status, **state}, status_code=200 if status == "ok" else 503)


def add_info(router: APIRouter, served: Served) -> None:
    @router.get("/info", responses=served.errors.only(401))
    async def info() -> dict[str, Any]:
        speculation = served.scheduler.speculation_snapshot()  # with a draft: it and the totals so far
        return {
            "model": served.model_name,
            "backend": served.backend.name,
            "spec": served.backend.spec.to_dict(),
            "tokenizer_vocab_size": served.tokenizer.vocab_size,
            "limits": served.settings.to_dict(),
            "kv_cache_reserved_bytes": served.scheduler.kv_reserved,  # the running batch's KV, set aside at start
            **({"speculation": speculation} if speculation is not None else {}),
            "version": __version__,
            **served.model_info,
        }


def add_metrics(router: APIRouter, served: Served) -> None:
    @router.get("/metrics", responses={**served.errors.only(401), 200: docs.METRICS_200})
    async def prometheus() -> Response:
        content, content_type = served.metrics.render()
        return Response(content, media_type=content_type)
