"""What a replica serves (``ReplicaConfig``) and how many replicas run (``Scaling``): ``cpm serve`` runs one replica
in its own process, ``cpm serve --ray`` and ``serve run cpm_infer.serve.ray_app:build`` many on Ray Serve.

Light on purpose (no Ray): ``Scaling`` is declared once (``cpm_infer.serve.fields``) and ``cpm serve``'s Ray
options are generated from it when the CLI starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cpm_infer.config import ConfigError
from cpm_infer.serve.fields import check_fields, flag_name, setting
from cpm_infer.serve.settings import ServeSettings


@dataclass(frozen=True)
class ReplicaConfig:
    """What a replica needs to build its app (sent to every Ray replica; the model path must exist on its node)."""

    model: str
    backend: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    threads: int | None = None  # None: the backend's default (on Ray: the replica's CPUs, not to oversubscribe)
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

    replicas: int = setting(1, "With --ray: replicas (the initial count).", ge=1)
    min_replicas: int | None = setting(None, "With --ray --max-replicas: fewest replicas.", ge=0)
    max_replicas: int | None = setting(None, "With --ray: autoscale up to this many replicas.", ge=1)
    # None: the batch size (a replica whose batch is full)
    target_ongoing_requests: float | None = setting(None, "With autoscaling: requests per replica to aim at.", ge=0.01)
    cpus: float = setting(1.0, "With --ray: CPUs per replica.", ge=0.01, label="CPUs per replica", arg="replica_cpus")
    gpus: float = setting(0.0, "With --ray: GPUs per replica.", ge=0, label="GPUs per replica", arg="replica_gpus")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_replicas is None:
            flags = {f.name: flag_name(f) for f in fields(self)}
            for name in ("min_replicas", "target_ongoing_requests"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{flags[name]} needs {flags['max_replicas']} (autoscaling)")
            return
        low = self.replicas if self.min_replicas is None else self.min_replicas
        if not low <= self.replicas <= self.max_replicas:
            raise ConfigError(
                f"replicas must satisfy min ({low}) <= replicas ({self.replicas}) <= max ({self.max_replicas})"
            )
