"""``cpm serve`` on Ray Serve: the same FastAPI app (``create_app``), one per replica, behind Ray's HTTP proxy.

Each replica loads its own model and runs its own continuous-batching scheduler; Ray routes requests to the least busy
replica, restarts dead ones and scales between bounds. Every answer carries ``x-cpm-replica`` (which replica made
it), ``/info`` shows it too, and a replica's health check is its own ``GET /health``.

Two ways in: ``cpm serve --ray`` (``application`` + ``serve.run``), or ``serve run cpm_infer.serve.ray_app:build
model=DIR replicas=2`` and a KubeRay RayService with ``import_path: cpm_infer.serve.ray_app:build`` (``build`` takes
the same settings as arguments, or ``CPM_MODEL`` / ``CPM_SERVE_*`` environment variables).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpm_infer.config import ConfigError
from cpm_infer.serve.settings import ServeSettings

log = logging.getLogger(__name__)

DEPLOYMENT = "cpm"
REPLICA_HEADER = "x-cpm-replica"


@dataclass(frozen=True)
class ReplicaConfig:
    """What a replica needs to build its app (sent to every replica; the model path must exist on its node)."""

    model: str
    backend: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    threads: int | None = None  # None: the replica's CPU count (replicas on one machine do not oversubscribe it)
    settings: ServeSettings = field(default_factory=ServeSettings)
    warmup: bool = True
    model_name: str | None = None  # the id clients send as "model" (default: the model directory's name)
    api_key: str | None = None  # as `cpm serve --api-key` (every route but /health needs it)

    def __repr__(self) -> str:  # Ray logs deployment arguments: never the key
        return f"ReplicaConfig(model={self.model!r}, backend={self.backend!r}, device={self.device!r}, ...)"


@dataclass(frozen=True)
class Scaling:
    """How many replicas and what each one reserves. ``max_replicas`` turns on Ray's autoscaler, which keeps
    about ``target_ongoing_requests`` requests on each replica, between ``min_replicas`` and ``max_replicas``
    (starting from ``replicas``)."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # default: the batch size (a replica whose batch is full)
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}")
        check(self.cpus > 0, f"CPUs per replica must be > 0, got {self.cpus}")
        check(self.gpus >= 0, f"GPUs per replica must be >= 0, got {self.gpus}")
        if self.max_replicas is None:
            check(self.min_replicas is None, "--min-replicas needs --max-replicas (autoscaling)")
            check(self.target_ongoing_requests is None, "--target-ongoing-requests needs --max-replicas (autoscaling)")
        else:
            low = self.replicas if self.min_replicas is None else self.min_replicas
            check(low >= 0, f"min replicas must be >= 0, got {low}")
            check(
                low <= self.replicas <= self.max_replicas,
                f"replicas must satisfy min ({low}) <= replicas ({self.replicas}) <= max ({self.max_replicas})",
            )
            target = self.target_ongoing_requests
            check(target is None or target > 0, f"target ongoing requests must be > 0, got {target}")


def deployment_options(scaling: Scaling, settings: ServeSettings) -> dict[str, Any]:
    """``serve.deployment`` options. A replica holds at most a full batch plus a full queue, as ``cpm serve`` does;
    Ray's router keeps up to one queue's worth more waiting for a free replica, then answers 503."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scaling.cpus, "num_gpus": scaling.gpus},
        "max_ongoing_requests": settings.max_batch + settings.queue_size,
        "max_queued_requests": settings.queue_size,
        # In-flight requests get the same grace as under `cpm serve` when a replica is stopped.
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s + 5,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if scaling.max_replicas is None:
        options["num_replicas"] = scaling.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.replicas if scaling.min_replicas is None else scaling.min_replicas,
            "initial_replicas": scaling.replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests or float(settings.max_batch),
        }
    return options


class ReplicaHeader:
    """ASGI middleware: every answer says which replica made it."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.ingress()
class CpmReplica:
    """One replica: one model, one ``create_app`` app (its own scheduler, limits and metrics)."""

    def __init__(self, config: ReplicaConfig, threads: int) -> None:
        self.config = config
        self.threads = config.threads or threads
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.built: ASGIApp | None = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # Built here, in the replica's process, so the model is loaded once per replica and never pickled.
        from cpm_infer.backends import load_backend
        from cpm_infer.serve.app import create_app

        c = self.config
        runtime, tok = load_backend(
            c.backend, c.model, device=c.device, tokenizer_file=c.tokenizer, threads=self.threads
        )
        app = create_app(
            runtime,
            tok,
            c.settings,
            model_name=c.model_name or Path(c.model).resolve().name,
            model_info={"path": c.model, "replica": self.replica},
            warmup=c.warmup,
            # A key in the replica's own environment (a Kubernetes secret) stays out of the deployment's config.
            api_key=c.api_key or os.environ.get("CPM_API_KEY") or None,
            owns_backend=True,
        )
        app.add_middleware(ReplicaHeader, replica=self.replica)
        # /metrics says which replica it describes (Ray's router picks the replica that answers a scrape).
        info = Gauge("cpm_replica_info", "The Ray Serve replica these metrics describe", ["replica"], registry=None)
        info.labels(self.replica).set(1)
        app.state.metrics.registry.register(info)
        log.info("replica %s serves %s (%s, %d threads)", self.replica, c.model, runtime.name, self.threads)
        self.built = app  # (`app` is the wrapper's own attribute)
        return app

    async def check_health(self) -> None:
        """Ray's periodic health check: the app's own ``/health`` (503 while it is shutting down)."""
        if self.built is None:
            return
        status = await asgi_status(self.built, "/health")
        if status != 200:
            raise RuntimeError(f"replica {self.replica}: GET /health answered {status}")


def application(config: ReplicaConfig, scaling: Scaling | None = None) -> Application:
    """The Ray Serve application (``serve.run(application(...))``)."""
    scaling = scaling or Scaling()
    threads = max(1, math.floor(scaling.cpus))
    deployment = serve.deployment(CpmReplica, name=DEPLOYMENT, **deployment_options(scaling, config.settings))
    return deployment.bind(config, threads)


class BuildArgs(BaseModel):
    """Arguments of ``build``: ``serve run cpm_infer.serve.ray_app:build model=DIR replicas=2 max_batch=16``
    (or ``args:`` in a RayService's ``serveConfigV2``). ``ServeSettings`` fields are accepted by name."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    backend: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    threads: int | None = None
    warmup: bool = True
    model_name: str | None = None
    api_key: str | None = None
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0


def build(args: dict[str, Any] | None = None) -> Application:
    """The importable application for ``serve run`` and KubeRay. Unset arguments fall back to ``CPM_MODEL`` and
    ``CPM_SERVE_<NAME>`` environment variables (e.g. ``CPM_SERVE_REPLICAS=2``)."""
    config, scaling = parse_build_args(args or {}, os.environ)
    return application(config, scaling)


def parse_build_args(args: dict[str, Any], env: dict[str, str] | os._Environ[str]) -> tuple[ReplicaConfig, Scaling]:
    names = set(BuildArgs.model_fields) | {f.name for f in fields(ServeSettings)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    merged = {name: env[f"CPM_SERVE_{name.upper()}"] for name in names if f"CPM_SERVE_{name.upper()}" in env}
    if "CPM_MODEL" in env:
        merged["model"] = env["CPM_MODEL"]
    merged.update(args)
    setting_names = {f.name for f in fields(ServeSettings)}
    try:
        parsed = BuildArgs(**{k: v for k, v in merged.items() if k not in setting_names})
        settings = TypeAdapter(ServeSettings).validate_python({k: v for k, v in merged.items() if k in setting_names})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ConfigError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from exc
    if not parsed.model:
        raise ConfigError("no model: pass model=DIR (or set CPM_MODEL)")
    config = ReplicaConfig(
        model=parsed.model,
        backend=parsed.backend,
        device=parsed.device,
        tokenizer=parsed.tokenizer,
        threads=parsed.threads,
        settings=settings,
        warmup=parsed.warmup,
        model_name=parsed.model_name,
        api_key=parsed.api_key,
    )
    scaling = Scaling(
        replicas=parsed.replicas,
        min_replicas=parsed.min_replicas,
        max_replicas=parsed.max_replicas,
        target_ongoing_requests=parsed.target_ongoing_requests,
        cpus=parsed.replica_cpus,
        gpus=parsed.replica_gpus,
    )
    return config, scaling


async def asgi_status(app: ASGIApp, path: str) -> int:
    """The status an in-process ``GET path`` gets from ``app``."""
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"replica")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return status
