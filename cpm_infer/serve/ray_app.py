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
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar

from prometheus_client import Gauge
from pydantic import TypeAdapter, ValidationError
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpm_infer.config import ConfigError
from cpm_infer.serve.auth import api_key_from_env
from cpm_infer.serve.fields import arg_names
from cpm_infer.serve.replicas import ReplicaConfig, Scaling
from cpm_infer.serve.settings import ServeSettings

log = logging.getLogger(__name__)

DEPLOYMENT = "cpm"
REPLICA_HEADER = "x-cpm-replica"
T = TypeVar("T")


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
        from cpm_infer.serve.app import load_app

        # A key in the replica's own environment (a Kubernetes secret) stays out of the deployment's config.
        config = replace(self.config, api_key=self.config.api_key or api_key_from_env())
        loaded = load_app(config, threads=self.threads, replica=self.replica)
        app = loaded.app
        app.add_middleware(ReplicaHeader, replica=self.replica)
        # /metrics says which replica it describes (Ray's router picks the replica that answers a scrape).
        info = Gauge("cpm_replica_info", "The Ray Serve replica these metrics describe", ["replica"], registry=None)
        info.labels(self.replica).set(1)
        app.state.metrics.registry.register(info)
        log.info("replica %s serves %s (%s, %d threads)", self.replica, config.model, loaded.backend.name, self.threads)
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


def build(args: dict[str, Any] | None = None) -> Application:
    """The importable application for ``serve run`` and KubeRay: ``serve run cpm_infer.serve.ray_app:build
    model=DIR replicas=2 max_batch=16`` (or ``args:`` in a RayService's ``serveConfigV2``). The arguments are the
    fields of ``ReplicaConfig``, ``ServeSettings`` and ``Scaling`` (``replica_cpus``, ``replica_gpus``: the names of
    ``cpm serve``'s flags); unset ones fall back to ``CPM_MODEL`` and ``CPM_SERVE_<NAME>`` environment variables
    (e.g. ``CPM_SERVE_REPLICAS=2``)."""
    config, scaling = parse_build_args(args or {}, os.environ)
    return application(config, scaling)


def parse_build_args(args: dict[str, Any], env: Mapping[str, str]) -> tuple[ReplicaConfig, Scaling]:
    """``build``'s arguments (strings are converted, as pydantic does) -> what to serve and how many replicas."""
    replica = {f.name: f.name for f in fields(ReplicaConfig) if f.name != "settings"}
    settings, scaling = arg_names(ServeSettings), arg_names(Scaling)
    names = {*replica, *settings, *scaling}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    merged = {name: env[f"CPM_SERVE_{name.upper()}"] for name in names if f"CPM_SERVE_{name.upper()}" in env}
    if "CPM_MODEL" in env:
        merged["model"] = env["CPM_MODEL"]
    merged.update(args)
    if not merged.get("model"):
        raise ConfigError("no model: pass model=DIR (or set CPM_MODEL)")
    merged["settings"] = _validated(ServeSettings, merged, settings)
    config = _validated(ReplicaConfig, merged, {**replica, "settings": "settings"})
    return config, _validated(Scaling, merged, scaling)


def _validated(cls: type[T], args: dict[str, Any], names: dict[str, str]) -> T:
    """``cls`` from the arguments naming its fields (``names``: argument -> field), validated by pydantic; a
    failure is one line that names the argument."""
    try:
        return TypeAdapter(cls).validate_python({field: args[arg] for arg, field in names.items() if arg in args})
    except ValidationError as exc:
        first = exc.errors()[0]
        arg_of = {field: arg for arg, field in names.items()}
        where = ".".join(str(arg_of.get(part, part)) for part in first["loc"])
        raise ConfigError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from exc


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
