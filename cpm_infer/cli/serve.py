"""``cpm serve``: the HTTP generation service (FastAPI + uvicorn, one model, dynamic batching).

The server limits and the Ray scaling options are generated from their declarations (``ServeSettings``,
``Scaling``: see ``cpm_infer.cli.serve_options``)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Annotated

import typer

from cpm_infer.cli.options import BackendOpt, DeviceOpt, ModelOpt, RayAddressOpt, ThreadsOpt, TokenizerOpt
from cpm_infer.cli.serve_options import Given, declared_options
from cpm_infer.cli.serve_ray import RayOpt, check_ray_only
from cpm_infer.serve.replicas import ReplicaConfig, Scaling
from cpm_infer.serve.settings import ServeSettings

log = logging.getLogger(__name__)


HostOpt = Annotated[str, typer.Option("--host", help="Address (loopback by default; 0.0.0.0 exposes it).")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0 = any free port).")]
NoWarmupOpt = Annotated[bool, typer.Option("--no-warmup", help="Skip the warm-up generation at start.")]
AccessLogOpt = Annotated[bool, typer.Option("--access-log", help="Log every request.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CPM_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /health.",
    ),
]


@declared_options(settings=ServeSettings, scaling=Scaling)
def serve(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    *,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    settings: Given[ServeSettings],  # --max-batch ... --shutdown-grace
    no_warmup: NoWarmupOpt = False,
    access_log: AccessLogOpt = False,
    api_key: ApiKeyOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    scaling: Given[Scaling],  # --replicas ... --replica-gpus
) -> None:
    """Serve a CPM model over HTTP: OpenAI's /v1/completions and /v1/models, /zuowen, /metrics, /health, /info."""
    from cpm_infer.deps import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    check_ray_only(scaling, ray)
    from cpm_infer.backends import detect_backend
    from cpm_infer.cli._common import resolve_model

    limits, replicas = settings.build(), scaling.build()
    if limits.draft is not None:  # a missing draft fails before the model loads
        from cpm_infer.serve.app import check_draft_path

        check_draft_path(limits.draft)
    model_path = resolve_model(model)
    config = ReplicaConfig(
        model=str(model_path),
        backend=detect_backend(model_path) if backend == "auto" else backend,
        device=device,
        tokenizer=str(tokenizer) if tokenizer else None,
        threads=threads,
        settings=limits,
        warmup=not no_warmup,
        api_key=api_key or None,
    )
    if not _is_loopback(host) and not api_key:
        print(
            f"warning: listening on {host} without an API key: anyone who can reach it can use the model "
            "(set --api-key or CPM_API_KEY)",
            file=sys.stderr,
            flush=True,
        )
    if ray:
        from cpm_infer.cli.serve_ray import serve_on_ray

        serve_on_ray(config, replicas, ray_address=ray_address, host=host, port=port)
    else:
        _serve_here(config, host, port, access_log)


def _serve_here(config: ReplicaConfig, host: str, port: int, access_log: bool) -> None:
    """One replica in this process, in the foreground, until Ctrl-C / SIGTERM (then a graceful stop)."""
    from cpm_infer.serve.app import load_app
    from cpm_infer.serve.server import bind, serve_forever, url_host

    sock = bind(host, port)  # fail on a taken port before spending time loading the model
    try:
        loaded = load_app(config)
    except BaseException:  # (a bad --draft, say): one-line error, nothing left listening
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    s = config.settings
    draft = f", speculative decoding with draft {s.draft} (up to {s.draft_tokens} tokens)" if s.draft else ""
    print(
        f"serving {config.model} ({loaded.backend.name}, loaded in {loaded.load_s:.1f} s) "
        f"on http://{url_host(bound_host)}:{bound_port}  "
        f"{s.batching} batching of up to {s.max_batch} rows, queue {s.queue_size}{draft}; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    level = logging.getLogger().getEffectiveLevel()
    try:
        serve_forever(loaded.app, sock, log_level="info" if level <= logging.INFO else "warning", access_log=access_log)
    finally:
        loaded.backend.close()  # idempotent (the shutdown already closed it); also when the server never started
        if loaded.draft is not None:
            loaded.draft.close()
    print("server stopped", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
