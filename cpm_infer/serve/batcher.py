"""The dynamic batcher: many HTTP requests, one model, one worker thread.

Requests wait in a bounded FIFO queue. The worker takes the oldest one plus every queued request
with the same generation settings (all but the seed) up to ``max_batch`` rows, waiting at most
``batch_wait_ms`` after the oldest arrived for batch-mates, and runs them as one ``generate`` call.
Each request keeps its own seed (``generate(seeds=...)``), so its output is the same whether it ran
alone or with others. A cancelled request (client gone, timeout, shutdown) leaves the queue at once,
or, when already running, is dropped from its batch after the current step (``should_stop``); its
batch-mates go on. Results and streamed text reach the request's event loop through an asyncio queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.errors import describe
from cpm_infer.generate import GenerationStats, TokenizerLike, generate
from cpm_infer.serve.errors import GenerationFailedError, QueueFullError, ShuttingDownError
from cpm_infer.serve.jobs import SHUTDOWN, ChoiceDone, ErrorEvent, Event, Job, TokenEvent, error_for
from cpm_infer.serve.settings import ServeSettings

log = logging.getLogger(__name__)


class Batcher:
    """Owns the model: one worker thread runs every generation; handlers only submit and wait."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TokenizerLike,
        settings: ServeSettings,
        metrics: Any = None,
        *,
        owns_backend: bool = False,
    ) -> None:
        self.backend = backend
        self.owns_backend = owns_backend  # close() also closes the backend (the server loaded it for itself)
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics  # a ServeMetrics, or None
        self.counters: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._closing = False  # no new requests (graceful shutdown began)
        self._stopped = False  # the worker exits
        self._thread: threading.Thread | None = None
        self._grace_timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def warmup(self) -> None:
        """One tiny generation before serving (first calls pay lazy initialisation); call before ``start``."""
        generate(self.backend, [[self.tokenizer.eod_id]], GenerationConfig(max_new_tokens=2), self.tokenizer)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="cpm-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; let in-flight ones finish for ``grace_s`` seconds, then cancel them."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()  # do not hold a batch open waiting for batch-mates
        log.info("shutting down: %d queued, %d running; grace %.1f s", len(self._pending), len(self._running), grace_s)
        if grace_s <= 0:
            self._cancel_all(SHUTDOWN)
        else:
            self._grace_timer = threading.Timer(grace_s, self._cancel_all, args=(SHUTDOWN,))
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel whatever is left and stop the worker (blocking: call it off the event loop)."""
        with self._cond:
            self._closing = self._stopped = True
            self._cond.notify_all()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self._cancel_all(SHUTDOWN)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation thread did not stop within %s s", timeout)
                return  # it may still be using the backend: leave it open
        if self.owns_backend:
            self.backend.close()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, stream: bool = False) -> Job:
        """Queue a request (call on the event loop). Raises at once when full or shutting down."""
        job = Job(prompts, config, stream=stream, timeout_s=self.settings.timeout_s)
        with self._cond:
            if self._closing:
                self.counters["rejected_shutting_down"] += 1
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            if len(self._pending) >= self.settings.queue_size:
                self.counters["rejected_queue_full"] += 1
                raise QueueFullError(f"the server is busy ({self.settings.queue_size} requests queued); retry later")
            self._pending.append(job)
            self.counters["accepted"] += 1
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """Give up on a request: it leaves the queue, or its rows stop after the current step.

        Returns False when it had already finished. The request's handler gets an ErrorEvent.
        """
        with self._cond:
            if job.state == "done":
                return False
            if job.state == "pending":
                self._pending.remove(job)
            job.state, job.stop_reason, job.finished = "done", reason, time.monotonic()
            self.counters[f"cancelled_{reason}"] += 1
            self._cond.notify_all()
        job.post(ErrorEvent(error_for(reason)))
        return True

    def snapshot(self) -> dict[str, object]:
        with self._cond:
            return {
                "queued": len(self._pending),
                "running": len(self._running),
                "running_rows": sum(job.rows for job in self._running),
                "closing": self._closing,
                "counters": dict(sorted(self.counters.items())),
            }

    # -- worker ------------------------------------------------------------------------------
    def _cancel_all(self, reason: str) -> None:
        with self._cond:
            jobs = [*self._pending, *self._running]
        for job in jobs:
            self.cancel(job, reason)

    def _work(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except Exception:
                log.exception("batch failed")
            finally:
                with self._cond:
                    self._running = []

    def _take_batch(self) -> list[Job] | None:
        """The oldest request and its compatible batch-mates, once the batch is full or the wait is over."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                key = first.config.replace(seed=None)  # equal settings but the seed can share a batch
                batch, rows = [], 0
                for job in self._pending:
                    if job is first or (
                        job.config.replace(seed=None) == key and rows + job.rows <= self.settings.max_batch
                    ):
                        batch.append(job)
                        rows += job.rows
                wait = first.created + self.settings.batch_wait_s - time.monotonic()
                if rows >= self.settings.max_batch or wait <= 0 or self._closing:
                    for job in batch:
                        self._pending.remove(job)
                        job.state = "running"
                    self._running = batch
                    return batch
                self._cond.wait(wait)

    def _run(self, jobs: list[Job]) -> None:
        rows = [(job, choice) for job in jobs for choice in range(job.rows)]  # generate's row -> its request
        started = time.monotonic()
        for job in jobs:
            job.started, job.batch_rows = started, len(rows)

        def on_text(index: int, text: str) -> None:
            job, choice = rows[index]
            if job.stream and job.state == "running":
                job.post(TokenEvent(choice, text))

        stats = GenerationStats()
        try:
            results = generate(
                self.backend,
                [p for job in jobs for p in job.prompts],
                jobs[0].config,  # equal keys: every job has the same settings but the seed
                self.tokenizer,
                callback=on_text if any(job.stream for job in jobs) else None,
                stats=stats,
                seeds=[job.config.seed for job in jobs for _ in job.prompts],
                should_stop=lambda index: rows[index][0].stop_reason,
            )
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(rows))
            for job in jobs:
                error = GenerationFailedError(f"generation failed: {describe(exc)}")
                self._finish(job, [ErrorEvent(error)])
            return
        with self._cond:
            self.counters["batches"] += 1
            self.counters["batched_rows"] += len(rows)
            self.counters["generated_tokens"] += stats.new_tokens
        if self.metrics is not None:
            self.metrics.generated(stats.new_tokens, stats.step_s)
        done: dict[int, list[Event]] = {}
        for (job, choice), result in zip(rows, results, strict=True):
            job.first_token = started + stats.first_token_s
            done.setdefault(id(job), []).append(ChoiceDone(choice, result))
        for job in jobs:
            self._finish(job, done[id(job)])

    def _finish(self, job: Job, events: list[Event]) -> None:
        with self._cond:
            if job.state == "done":  # cancelled meanwhile: its handler has its answer already
                return
            job.state, job.finished = "done", time.monotonic()
            self.counters["failed" if isinstance(events[0], ErrorEvent) else "completed"] += 1
        if self.metrics is not None and job.first_token is not None:
            self.metrics.first_token(job.first_token - job.created)
        for event in events:
            job.post(event)
