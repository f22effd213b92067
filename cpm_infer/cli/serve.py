"""``cpm serve``: the HTTP generation service (FastAPI + uvicorn, one model, dynamic batching)."""

from __future__ import annotations

import ipaddress
import logging
import sys
import time
from typing import Annotated

import typer

from cpm_infer.cli.options import BackendOpt, DeviceOpt, ModelOpt, RayAddressOpt, ThreadsOpt, TokenizerOpt
from cpm_infer.cli.serve_ray import (
    MaxReplicasOpt,
    MinReplicasOpt,
    RayFlags,
    RayOpt,
    ReplicaCpusOpt,
    ReplicaGpusOpt,
    ReplicasOpt,
    TargetOpt,
)

log = logging.getLogger(__name__)


HostOpt = Annotated[str, typer.Option("--host", help="Address (loopback by default; 0.0.0.0 exposes it).")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0 = any free port).")]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", min=1, help="Rows in the running batch (1 = one at a time).")]
BatchingOpt = Annotated[
    str,
    typer.Option(
        "--batching", help="continuous: requests join the running batch at every step; static: a batch runs to its end."
    ),
]
WaitOpt = Annotated[float, typer.Option("--batch-wait-ms", min=0, help="Static batching: wait for batch-mates.")]
QueueOpt = Annotated[int, typer.Option("--queue-size", min=1, help="Requests waiting to join; more get 503.")]
CapOpt = Annotated[int, typer.Option("--max-new-tokens-cap", min=1, help="Largest max_new_tokens a request may ask.")]
DefaultTokensOpt = Annotated[int, typer.Option("--default-max-new-tokens", min=1, help="When a request gives none.")]
SamplesOpt = Annotated[int, typer.Option("--max-samples", min=1, help="Most choices (prompts x n) per request.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds a request may take (504 after).")]
BodyOpt = Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body in KiB (413 above).")]
GraceOpt = Annotated[float, typer.Option("--shutdown-grace", min=0, help="Seconds in-flight requests get on stop.")]
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


def serve(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    max_batch: MaxBatchOpt = 8,
    batching: BatchingOpt = "continuous",
    batch_wait_ms: WaitOpt = 10.0,
    queue_size: QueueOpt = 64,
    max_new_tokens_cap: CapOpt = 512,
    default_max_new_tokens: DefaultTokensOpt = 100,
    max_samples: SamplesOpt = 16,
    timeout: TimeoutOpt = 60.0,
    max_body_kb: BodyOpt = 64,
    shutdown_grace: GraceOpt = 10.0,
    no_warmup: NoWarmupOpt = False,
    access_log: AccessLogOpt = False,
    api_key: ApiKeyOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = 1,
    min_replicas: MinReplicasOpt = None,
    max_replicas: MaxReplicasOpt = None,
    target_ongoing_requests: TargetOpt = None,
    replica_cpus: ReplicaCpusOpt = 1.0,
    replica_gpus: ReplicaGpusOpt = 0.0,
) -> None:
    """Serve a CPM model over HTTP: OpenAI's /v1/completions and /v1/models, /zuowen, /metrics, /health, /info."""
    from cpm_infer.deps import require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    require("prometheus_client", "serve")
    ray_flags = RayFlags(
        ray_address, replicas, min_replicas, max_replicas, target_ongoing_requests, replica_cpus, replica_gpus
    )
    ray_flags.check(ray)
    from cpm_infer.backends import detect_backend, load_backend
    from cpm_infer.cli._common import resolve_model
    from cpm_infer.serve.app import create_app
    from cpm_infer.serve.server import bind, serve_forever
    from cpm_infer.serve.settings import ServeSettings

    settings = ServeSettings(
        max_batch=max_batch,
        batching=batching,
        batch_wait_ms=batch_wait_ms,
        queue_size=queue_size,
        max_new_tokens_cap=max_new_tokens_cap,
        default_max_new_tokens=min(default_max_new_tokens, max_new_tokens_cap),
        max_samples=max_samples,
        timeout_s=timeout,
        max_body_bytes=max_body_kb * 1024,
        shutdown_grace_s=shutdown_grace,
    )
    model_path = resolve_model(model)
    backend_name = detect_backend(model_path) if backend == "auto" else backend
    if not _is_loopback(host) and not api_key:
        print(
            f"warning: listening on {host} without an API key: anyone who can reach it can use the model "
            "(set --api-key or CPM_API_KEY)",
            file=sys.stderr,
            flush=True,
        )
    if ray:
        from cpm_infer.cli.serve_ray import serve_on_ray

        serve_on_ray(
            model_path,
            ray_flags,
            backend=backend_name,
            device=device,
            tokenizer=tokenizer,
            threads=threads,
            settings=settings,
            warmup=not no_warmup,
            api_key=api_key or None,
            host=host,
            port=port,
        )
        return
    sock = bind(host, port)  # fail on a taken port before spending time loading the model
    start = time.perf_counter()
    runtime, tok = load_backend(backend_name, model_path, device=device, tokenizer_file=tokenizer, threads=threads)
    load_s = round(time.perf_counter() - start, 2)
    name, info = model_path.resolve().name, {"path": str(model_path), "load_s": load_s}
    app = create_app(
        runtime,
        tok,
        settings,
        model_name=name,
        model_info=info,
        warmup=not no_warmup,
        api_key=api_key or None,
        owns_backend=True,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    print(
        f"serving {model_path} ({runtime.name}, loaded in {load_s:.1f} s) "
        f"on http://{_url_host(bound_host)}:{bound_port}  "
        f"{batching} batching of up to {max_batch} rows, queue {queue_size}; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    level = logging.getLogger().getEffectiveLevel()
    try:
        serve_forever(app, sock, log_level="info" if level <= logging.INFO else "warning", access_log=access_log)
    finally:
        runtime.close()  # idempotent (the shutdown already closed it); also when the server never started
    print("server stopped", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
