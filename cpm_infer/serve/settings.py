"""Server limits: one validated object shared by the CLI, the app, the scheduler and Ray Serve replicas.

Each field is declared once (``cpm_infer.serve.fields``): its default, range and help make the options of
``cpm serve`` and the arguments of ``serve run cpm_infer.serve.ray_app:build`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from cpm_infer.config import ConfigError
from cpm_infer.serve.fields import check_fields, setting
from cpm_infer.settings import DRAFT_TOKENS, DRAFT_TOKENS_HELP, MAX_DRAFT_TOKENS

_BATCHING_HELP = "continuous: requests join the running batch at every step; static: a batch runs to its end."


@dataclass(frozen=True)
class ServeSettings:
    """How much the server accepts and how it batches.

    ``max_batch`` counts rows (a request with p prompts and n choices takes p x n); a request larger than it
    still runs. ``queue_size`` bounds the requests waiting to join the batch: one more gets 503 at once.
    ``timeout_s`` bounds a request from arrival to its last token (504 after it). ``batch_wait_ms`` is how long
    static batching waits for batch-mates (continuous batching admits at every step). A default
    ``max_new_tokens`` over the cap is the cap. ``prefix_cache_mb`` bounds the prefix cache (a prompt sharing at least
    32 leading tokens with one prefilled before starts from its KV snapshot); ``prefill_chunk``: while rows are
    decoding, at most that many prompt tokens are prefilled per step (oldest prompt first), so the running rows keep
    getting tokens (both where the backend has ``KvCacheOps``: torch, onnxruntime; ``cpm_infer.engine.prefix_cache``).
    ``kv_reserve``: the running batch's KV buffers at full context, set aside at start (ONNX artifacts with shared KV
    buffers; ``OrtBackend.reserve``). ``draft``: speculative decoding while the running batch has one row, with a
    draft model directory (the target's vocabulary) or ``ngram`` (prompt lookup), proposing up to ``draft_tokens``
    per verify pass (``cpm_infer.engine.speculative``; a request may opt out with ``"speculative": false``).
    """

    max_batch: int = setting(8, "Rows in the running batch (1 = one at a time).", ge=1, label="max batch")
    batching: str = setting("continuous", _BATCHING_HELP, choices=("continuous", "static"))
    batch_wait_ms: float = setting(10.0, "Static batching: wait for batch-mates.", ge=0, label="batch wait", unit="ms")
    queue_size: int = setting(64, "Requests waiting to join; more get 503.", ge=1)
    max_new_tokens_cap: int = setting(
        512, "Largest max_new_tokens a request may ask.", ge=1, label="max_new_tokens cap"
    )
    default_max_new_tokens: int = setting(100, "When a request gives none.", ge=1, label="default max_new_tokens")
    max_samples: int = setting(16, "Most choices (prompts x n) per request.", ge=1)
    timeout_s: float = setting(
        60.0, "Seconds a request may take (504 after).", ge=0.001, label="timeout", unit="s", flag="--timeout"
    )
    max_body_bytes: int = setting(
        64 * 1024,
        "Largest request body in KiB (413 above).",
        ge=256,
        label="max body size",
        unit="bytes",
        flag="--max-body-kb",
        scale=1024,
    )
    prefix_cache_mb: int = setting(
        256, "KV snapshots of prompts kept for reuse by prompts that start alike (0: off).", ge=0, unit="MiB"
    )
    kv_reserve: str = setting(
        "auto",
        "auto: set the running batch's KV cache aside at full context at start (flat memory, no step allocates; "
        "skipped, with a warning, where it would take over half the free memory); off: grow it as rows need.",
        choices=("auto", "off"),
        label="KV reserve",
    )
    prefill_chunk: int = setting(
        32, "Prompt tokens prefilled per step while rows are decoding (0: whole prompts at once).", ge=0
    )
    draft: str | None = setting(
        None,
        "Speculative decoding while one sequence runs: a draft model directory with the model's vocabulary "
        "(its int4 artifact, a distilled student) or 'ngram' (prompt lookup, no model).",
    )
    draft_tokens: int = setting(DRAFT_TOKENS, DRAFT_TOKENS_HELP, ge=1, le=MAX_DRAFT_TOKENS)
    shutdown_grace_s: float = setting(
        10.0, "Seconds in-flight requests get on stop.", ge=0, label="shutdown grace", unit="s", flag="--shutdown-grace"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.draft is not None and not self.draft.strip():
            raise ConfigError("draft must be a model directory or 'ngram', got an empty string")
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            object.__setattr__(self, "default_max_new_tokens", self.max_new_tokens_cap)  # (frozen)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
