"""``cpm serve --ray``: the same service on Ray Serve (replicas behind Ray's HTTP proxy, on one machine or many)."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cpm_infer.errors import CpmError, first_line

if TYPE_CHECKING:
    from cpm_infer.serve.settings import ServeSettings

APP_NAME = "cpm"

RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray Serve: --replicas copies of the model behind one URL.")]
ReplicasOpt = Annotated[int, typer.Option("--replicas", min=1, help="With --ray: replicas (the initial count).")]
MinReplicasOpt = Annotated[
    int | None, typer.Option("--min-replicas", min=0, help="With --ray --max-replicas: fewest replicas.")
]
MaxReplicasOpt = Annotated[
    int | None, typer.Option("--max-replicas", min=1, help="With --ray: autoscale up to this many replicas.")
]
TargetOpt = Annotated[
    float | None,
    typer.Option("--target-ongoing-requests", min=0.01, help="With autoscaling: requests per replica to aim at."),
]
ReplicaCpusOpt = Annotated[float, typer.Option("--replica-cpus", min=0.01, help="With --ray: CPUs per replica.")]
ReplicaGpusOpt = Annotated[float, typer.Option("--replica-gpus", min=0, help="With --ray: GPUs per replica.")]


class RayServeError(CpmError):
    """The application could not be deployed on Ray Serve."""


@dataclass(frozen=True)
class RayFlags:
    """``cpm serve``'s Ray options, as given."""

    ray_address: str | None = None
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def check(self, ray: bool) -> None:
        """Ray-only flags without ``--ray`` are a mistake, not something to ignore silently (the address is not
        checked: it may come from ``RAY_ADDRESS``, set for every command on a cluster's machines)."""
        default = RayFlags()
        given = [
            f.name
            for f in fields(self)
            if f.name != "ray_address" and getattr(self, f.name) != getattr(default, f.name)
        ]
        if given and not ray:
            raise CpmError(f"{', '.join('--' + name.replace('_', '-') for name in given)} only apply with --ray")


def serve_on_ray(
    model: Path,
    flags: RayFlags,
    *,
    backend: str,
    device: str,
    tokenizer: Path | None,
    threads: int | None,
    settings: ServeSettings,
    warmup: bool,
    api_key: str | None,
    host: str,
    port: int,
) -> None:
    """Deploy, print the URL, and wait for Ctrl-C / SIGTERM; then remove the application (replicas get their
    shutdown grace) and, for a cluster started here, stop it."""
    from cpm_infer.cluster import connected, prefer_loopback
    from cpm_infer.deps import require

    prefer_loopback(flags.ray_address)
    require("ray.serve", "ray")
    from ray import serve

    from cpm_infer.serve.ray_app import ReplicaConfig, Scaling, application

    config = ReplicaConfig(
        model=str(model.resolve()),  # replicas run elsewhere (other directories, other nodes)
        backend=backend,
        device=device,
        tokenizer=str(tokenizer.resolve()) if tokenizer else None,
        threads=threads,
        settings=settings,
        warmup=warmup,
        api_key=api_key,
    )
    scaling = Scaling(
        replicas=flags.replicas,
        min_replicas=flags.min_replicas,
        max_replicas=flags.max_replicas,
        target_ongoing_requests=flags.target_ongoing_requests,
        cpus=flags.replica_cpus,
        gpus=flags.replica_gpus,
    )
    port = _free_port(host, port)  # Ray's proxy binds it: fail on a taken port before starting anything
    with connected(flags.ray_address) as local:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(config, scaling), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise RayServeError(f"Ray Serve could not deploy the model: {first_line(exc)}") from exc
        count = f"{scaling.replicas} replica(s)"
        if scaling.max_replicas is not None:
            count += f", autoscaling up to {scaling.max_replicas}"
        url_host = f"[{host}]" if ":" in host else host
        print(
            f"serving {config.model} on http://{url_host}:{port} with Ray Serve ({count}, "
            f"{scaling.cpus:g} CPU / {scaling.gpus:g} GPU each); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        _wait_for_signal()
        print("stopping: in-flight requests get the shutdown grace", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    print("server stopped", file=sys.stderr)


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _free_port(host: str, port: int) -> int:
    from cpm_infer.serve.server import bind

    sock = bind(host, port)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()
