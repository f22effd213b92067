"""``cpm serve --ray``: the same service on Ray Serve (replicas behind Ray's HTTP proxy, on one machine or many)."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cpm_infer.errors import CpmError, first_line

if TYPE_CHECKING:
    from cpm_infer.cli.serve_options import Given
    from cpm_infer.serve.replicas import ReplicaConfig, Scaling

APP_NAME = "cpm"

RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray Serve: --replicas copies of the model behind one URL.")]


class RayServeError(CpmError):
    """The application could not be deployed on Ray Serve."""


def check_ray_only(scaling: Given[Scaling], ray: bool) -> None:
    """Ray-only options without ``--ray`` are a mistake, not something to ignore silently (``--ray-address`` is not
    checked: it may come from ``RAY_ADDRESS``, set for every command on a cluster's machines)."""
    given = scaling.changed_flags()
    if given and not ray:
        raise CpmError(f"{', '.join(given)} only apply with --ray")


def serve_on_ray(config: ReplicaConfig, scaling: Scaling, *, ray_address: str | None, host: str, port: int) -> None:
    """Deploy, print the URL, and wait for Ctrl-C / SIGTERM; then remove the application (replicas get their
    shutdown grace) and, for a cluster started here, stop it."""
    from cpm_infer.cluster import connected, prefer_loopback
    from cpm_infer.deps import require

    prefer_loopback(ray_address)
    require("ray.serve", "ray")
    from ray import serve

    from cpm_infer.engine.speculative import NGRAM
    from cpm_infer.serve.ray_app import application
    from cpm_infer.serve.server import url_host

    # Replicas run elsewhere (other directories, other nodes): absolute paths (a draft model's too).
    tokenizer = str(Path(config.tokenizer).resolve()) if config.tokenizer else None
    draft = config.settings.draft
    if draft is not None and draft != NGRAM:
        config = replace(config, settings=replace(config.settings, draft=str(Path(draft).resolve())))
    config = replace(config, model=str(Path(config.model).resolve()), tokenizer=tokenizer)
    port = _free_port(host, port)  # Ray's proxy binds it: fail on a taken port before starting anything
    with connected(ray_address) as local:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(config, scaling), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise RayServeError(f"Ray Serve could not deploy the model: {first_line(exc)}") from exc
        count = f"{scaling.replicas} replica(s)"
        if scaling.max_replicas is not None:
            count += f", autoscaling up to {scaling.max_replicas}"
        print(
            f"serving {config.model} on http://{url_host(host)}:{port} with Ray Serve ({count}, "
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
