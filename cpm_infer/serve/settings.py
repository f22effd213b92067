"""Server limits: one validated object shared by the CLI, the app and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from cpm_infer.config import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    """How much the server accepts and how it batches.

    ``max_batch`` counts rows (a request with p prompts and n choices takes p x n); a request larger than it
    still runs. ``queue_size`` bounds the requests waiting to join the batch: one more gets 503 at once.
    ``timeout_s`` bounds a request from arrival to its last token (504 after it). ``batch_wait_ms`` is how long
    static batching waits for batch-mates (continuous batching admits at every step).
    """

    max_batch: int = 8
    batching: str = "continuous"  # or "static" (a batch runs to its end before the next one forms)
    batch_wait_ms: float = 10.0
    queue_size: int = 64
    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 100
    max_samples: int = 16
    timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.max_batch >= 1, f"max batch must be >= 1, got {self.max_batch}")
        check(
            self.batching in ("continuous", "static"),
            f"batching must be 'continuous' or 'static', got {self.batching!r}",
        )
        check(self.batch_wait_ms >= 0, f"batch wait must be >= 0 ms, got {self.batch_wait_ms}")
        check(self.queue_size >= 1, f"queue size must be >= 1, got {self.queue_size}")
        check(self.max_new_tokens_cap >= 1, f"max_new_tokens cap must be >= 1, got {self.max_new_tokens_cap}")
        check(
            self.default_max_new_tokens >= 1,
            f"default max_new_tokens must be >= 1, got {self.default_max_new_tokens}",
        )
        check(self.max_samples >= 1, f"max samples must be >= 1, got {self.max_samples}")
        check(self.timeout_s > 0, f"timeout must be > 0 s, got {self.timeout_s}")
        check(self.max_body_bytes >= 256, f"max body size must be >= 256 bytes, got {self.max_body_bytes}")
        check(self.shutdown_grace_s >= 0, f"shutdown grace must be >= 0 s, got {self.shutdown_grace_s}")

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000

    def to_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
