"""`cpm serve --ray`'s pieces without a cluster: scaling flags -> Ray Serve options, the importable application's
arguments, the replica header and the in-process health check (on the real app)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from conftest import run_cli

from cpm_infer.config import ConfigError
from cpm_infer.serve.ray_app import (
    REPLICA_HEADER,
    ReplicaHeader,
    Scaling,
    asgi_status,
    deployment_options,
    parse_build_args,
)
from cpm_infer.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_batch=4, queue_size=10, shutdown_grace_s=3)


def test_fixed_replicas_and_resources():
    options = deployment_options(Scaling(replicas=3, cpus=2, gpus=0.5), SETTINGS)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    # A replica holds a full batch and a full queue, as `cpm serve` does; Ray keeps one queue's worth more.
    assert options["max_ongoing_requests"] == 14 and options["max_queued_requests"] == 10
    assert options["graceful_shutdown_timeout_s"] == 8


def test_autoscaling():
    options = deployment_options(Scaling(replicas=2, min_replicas=1, max_replicas=6), SETTINGS)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 4.0,
    }
    target = deployment_options(Scaling(max_replicas=2, target_ongoing_requests=1.5), SETTINGS)
    assert target["autoscaling_config"]["target_ongoing_requests"] == 1.5
    assert target["autoscaling_config"]["min_replicas"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": 0}, "replicas must be >= 1"),
        ({"min_replicas": 1}, "--min-replicas needs --max-replicas"),
        ({"target_ongoing_requests": 2.0}, "needs --max-replicas"),
        ({"replicas": 3, "max_replicas": 2}, r"min \(3\) <= replicas \(3\) <= max \(2\)"),
        ({"replicas": 1, "min_replicas": 2, "max_replicas": 4}, "min"),
        ({"cpus": 0}, "CPUs per replica must be >= 0.01, got 0"),
        ({"gpus": -1}, "GPUs per replica must be >= 0"),
        ({"min_replicas": -1, "max_replicas": 2}, "min replicas must be >= 0"),
        ({"max_replicas": 2, "target_ongoing_requests": 0.0}, "target ongoing requests must be >= 0.01"),
    ],
)
def test_bad_scaling_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Scaling(**kwargs)


def test_build_args_with_environment_fallback(tmp_path):
    env = {"CPM_MODEL": "/models/a", "CPM_SERVE_REPLICAS": "3", "CPM_SERVE_MAX_BATCH": "16", "OTHER": "x"}
    config, scaling = parse_build_args({"replica_cpus": "2", "queue_size": "5"}, env)
    assert config.model == "/models/a" and config.settings.max_batch == 16 and config.settings.queue_size == 5
    assert scaling.replicas == 3 and scaling.cpus == 2.0
    config, _ = parse_build_args({"model": "/models/b", "warmup": "false"}, env)  # arguments win
    assert config.model == "/models/b" and config.warmup is False
    config, scaling = parse_build_args({"max_new_tokens_cap": 50, "replica_gpus": 1, "threads": "3"}, env)
    assert config.settings.default_max_new_tokens == 50 and scaling.gpus == 1.0 and config.threads == 3


def test_build_arguments_and_cli_flags_come_from_the_declarations():
    """One declaration per field: the flag, the ``serve run`` argument and the dataclass agree."""
    from dataclasses import fields

    from cpm_infer.serve.fields import arg_names, flag_name
    from cpm_infer.serve.replicas import Scaling as Declared

    assert Scaling is Declared
    assert arg_names(Scaling) == {
        "replicas": "replicas",
        "min_replicas": "min_replicas",
        "max_replicas": "max_replicas",
        "target_ongoing_requests": "target_ongoing_requests",
        "replica_cpus": "cpus",
        "replica_gpus": "gpus",
    }
    flags = [flag_name(f) for f in fields(ServeSettings)]
    assert {"--timeout", "--max-body-kb", "--shutdown-grace"} <= set(flags)  # flags named apart from their fields


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "no model"),
        ({"model": "m", "replicaz": 2}, "unknown argument.*replicaz"),
        ({"model": "m", "max_batch": "many"}, "max_batch: Input should be a valid integer"),
        ({"model": "m", "max_batch": 0}, "max batch must be >= 1"),
        ({"model": "m", "replicas": 2, "max_replicas": 1}, "replicas"),
        ({"model": "m", "replica_cpus": "lots"}, "replica_cpus: Input should be a valid number"),
        ({"model": "m", "threads": "many"}, "threads: Input should be a valid integer"),
    ],
)
def test_bad_build_args_are_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_build_args(args, {})
    assert "\n" not in str(info.value)


def test_replica_header_and_health_on_the_real_app(tiny_checkpoint):
    from cpm_infer.backends import load_backend
    from cpm_infer.serve.app import create_app

    backend, tok = load_backend("torch", tiny_checkpoint)
    app = create_app(backend, tok, SETTINGS, warmup=False)
    app.add_middleware(ReplicaHeader, replica="r-1")
    sent: list[dict] = []

    async def call(path: str) -> int:
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"", "root_path": ""}
        await app(scope, receive, send)
        return sent[0]["status"]

    assert asyncio.run(call("/v1/models")) == 200
    assert (REPLICA_HEADER.encode(), b"r-1") in sent[0]["headers"]
    assert asyncio.run(asgi_status(app, "/health")) == 200
    app.state.scheduler.begin_shutdown(0)
    assert asyncio.run(asgi_status(app, "/health")) == 503  # a draining replica fails Ray's health check


def test_ray_flags_need_ray(monkeypatch, capsys, tiny_checkpoint):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "-m", str(tiny_checkpoint), "--replicas", "2")
    assert code == 1 and err.strip() == "error: --replicas only apply with --ray"
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--replica-gpus", "1", "--max-replicas", "3")
    assert code == 1 and "--max-replicas, --replica-gpus only apply with --ray" in err
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--min-replicas", "2")  # before the scaling checks
    assert code == 1 and err.strip() == "error: --min-replicas only apply with --ray"
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--ray", "--min-replicas", "2")
    assert code == 1 and err.strip() == "error: --min-replicas needs --max-replicas (autoscaling)"
