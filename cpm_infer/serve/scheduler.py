"""The scheduler: many HTTP requests, one model, one generation thread driving the engine.

Requests wait in a bounded FIFO queue (``queue_size``; one more gets 503 at once). Admission is FIFO:

- ``continuous`` (default): before every engine step, queued requests join the running batch while their rows fit
  in ``max_batch`` (a request larger than ``max_batch`` joins an empty batch and the engine feeds it in). Whatever
  its settings, a request starts at the next step instead of waiting for the batch to finish; rows leave as they
  finish.
- ``static`` (for comparison): a batch is formed when the engine is idle (the oldest request, then the following
  ones that fit, after waiting up to ``batch_wait_ms`` for batch-mates) and runs until its last row finishes.

Each row is seeded from (seed, prompt index, sample index), so its text does not depend on its batch-mates. A
cancelled request (client gone, timeout, shutdown) leaves the queue at once, or its rows leave the running batch
before the next step. The engine is single-threaded: only the generation thread touches it.

With a draft (``--draft``: ``cpm_infer.engine.speculative``), the engine decodes speculatively while its running batch
has one row, except for the rows of a request that opted out (``"speculative": false``); the scheduler owns the draft
(``close`` closes it) and one ``SpeculationStats`` that every engine it makes counts into, so the totals in
``/metrics`` only grow, also across a new engine after a failed step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine import Engine, FinishEvent, TokenizerLike
from cpm_infer.engine import TokenEvent as EngineToken
from cpm_infer.engine.prefix_cache import PrefixCache
from cpm_infer.engine.speculative import Draft, SpeculationStats
from cpm_infer.errors import CpmError, describe
from cpm_infer.serve.errors import GenerationFailedError, InvalidRequestError, QueueFullError, ShuttingDownError
from cpm_infer.serve.jobs import SHUTDOWN, ChoiceDone, ErrorEvent, Job, TokenEvent, error_for
from cpm_infer.serve.metrics import ServeMetrics
from cpm_infer.serve.settings import ServeSettings

log = logging.getLogger(__name__)


class Scheduler:
    """Owns the model: one thread runs every engine step; handlers only submit, cancel and await events."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TokenizerLike,
        settings: ServeSettings,
        metrics: ServeMetrics | None = None,
        *,
        owns_backend: bool = False,
        draft: Draft | None = None,
    ) -> None:
        self.backend = backend
        self.owns_backend = owns_backend  # close() also closes the backend (the server loaded it for itself)
        self.draft = draft  # the server's own: close() closes it
        self.speculation = SpeculationStats()  # every engine counts into it (monotonic across new engines)
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.counters: Counter[str] = Counter()
        # One prefix cache for the server's life: a new engine after a failed step keeps it (its entries are copies).
        self.prefix_cache = PrefixCache(settings.prefix_cache_mb * 2**20) if settings.prefix_cache_mb else None
        self.engine = self._new_engine()
        if metrics is not None and self.engine.prefix_cache is not None:
            metrics.watch_prefix_cache(lambda: self.engine.prefix_cache.stats.as_dict())
        if metrics is not None and draft is not None:
            metrics.watch_speculation(lambda: asdict(self.speculation))
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: set[Job] = set()
        self._to_cancel: list[tuple[int, str]] = []  # (row id, reason), applied by the generation thread
        self._engine_rows = 0  # rows in the engine (running or fed in), as of the last step
        self._last_token: dict[int, float] = {}  # row id -> when it produced its last token
        self._closing = False  # no new requests (graceful shutdown began)
        self._stopped = False  # the generation thread exits
        self._thread: threading.Thread | None = None
        self._grace_timer: threading.Timer | None = None
        self.kv_reserved = 0  # bytes of KV buffers the backend set aside for the running batch (warmup)

    def _new_engine(self) -> Engine:
        settings = self.settings
        return Engine(
            self.backend,
            self.tokenizer,
            max_rows=settings.max_batch,
            prefix_cache=self.prefix_cache,
            prefill_chunk=settings.prefill_chunk,
            draft=self.draft,
            draft_tokens=settings.draft_tokens,
            speculation_stats=self.speculation,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def warmup(self) -> None:
        """One tiny generation before serving (first calls pay lazy initialisation); call before ``start``. With a
        draft, more tokens: after the plain steps that time the model (``Engine.plain_step``) come speculative ones,
        so the draft and the verify pass are warmed up too."""
        self._reserve_kv()
        tokens = 2 + self.engine.plain_step.warm + 2 if self.draft is not None else 2
        config = GenerationConfig(max_new_tokens=tokens, ignore_eos=True)
        self.engine.add([self.tokenizer.eod_id], config, seed=0)
        while self.engine.has_work():
            self.engine.step()
        self.speculation.reset()  # /metrics counts requests only

    def _reserve_kv(self) -> None:
        """The running batch's KV buffers at full context, touched now (``kv_reserve``); not where they would take
        over half the memory free now (the weights' and the prefix cache's room), nor for static batching (a batch is
        prefilled whole: nothing joins it)."""
        reserve = getattr(self.backend, "reserve", None)
        if reserve is None or self.settings.kv_reserve == "off" or self.settings.batching != "continuous":
            return
        need, free = reserve(self.settings.max_batch, dry_run=True), available_memory()
        if free is not None and need > free / 2:
            log.warning(
                "KV cache not set aside: %d rows at full context take %.0f MiB, over half the %.0f MiB free "
                "(it grows as rows need; a smaller --max-batch would fit)",
                self.settings.max_batch,
                need / 2**20,
                free / 2**20,
            )
            return
        self.kv_reserved = reserve(self.settings.max_batch)
        if self.kv_reserved:
            log.info("KV cache: %.0f MiB set aside for %d rows", self.kv_reserved / 2**20, self.settings.max_batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="cpm-serve-engine", daemon=True)
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
            self._cond.notify_all()  # do not hold a static batch open waiting for batch-mates
        log.info("shutting down: %d queued, %d running; grace %.1f s", len(self._pending), len(self._running), grace_s)
        if grace_s <= 0:
            self._cancel_all(SHUTDOWN)
        else:
            self._grace_timer = threading.Timer(grace_s, self._cancel_all, args=(SHUTDOWN,))
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel whatever is left and stop the generation thread (blocking: call it off the event loop)."""
        self._cancel_all(SHUTDOWN)
        with self._cond:
            self._closing = self._stopped = True
            self._cond.notify_all()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation thread did not stop within %s s", timeout)
                return  # it may still be using the backend: leave it open
        if self.draft is not None:
            self.draft.close()
        if self.owns_backend:
            self.backend.close()

    # -- requests ----------------------------------------------------------------------------
    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        stream: bool = False,
        speculate: bool = True,
    ) -> Job:
        """Queue a request (call on the event loop). Raises at once when full or shutting down. ``speculate=False``:
        its rows never decode speculatively (where the server has a draft)."""
        job = Job(prompts, config, stream=stream, timeout_s=self.settings.timeout_s, speculate=speculate)
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
        """Give up on a request: it leaves the queue, or its rows leave the batch before the next step.

        Returns False when it had already finished. The request's handler gets an ErrorEvent.
        """
        with self._cond:
            if job.state == "done":
                return False
            if job.state == "pending":
                self._pending.remove(job)
            else:
                self._running.discard(job)
                self._to_cancel += [(row_id, reason) for row_id in job.row_ids]
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
                "running_rows": self._engine_rows,
                "closing": self._closing,
                "counters": dict(sorted(self.counters.items())),
            }

    def speculation_snapshot(self) -> dict[str, Any] | None:
        """The draft and the speculation totals so far (``/info``); None without a draft."""
        if self.draft is None:
            return None
        draft = self.settings.draft or self.draft.name
        return {"draft": draft, "draft_tokens": self.settings.draft_tokens, **asdict(self.speculation)}

    # -- generation thread -------------------------------------------------------------------
    def _cancel_all(self, reason: str) -> None:
        with self._cond:
            jobs = [*self._pending, *self._running]
        for job in jobs:
            self.cancel(job, reason)

    @property
    def alive(self) -> bool:
        """The generation thread runs (or was never started); False when it died: /health then fails."""
        return self._thread is None or self._thread.is_alive() or self._stopped

    def _work(self) -> None:
        while True:
            try:
                with self._cond:
                    if not self._admit():
                        return
                    for row_id, reason in self._to_cancel:
                        self.engine.cancel(row_id, reason)
                    self._to_cancel.clear()
                events = self.engine.step()
                self._dispatch(events, time.monotonic())
            except Exception as exc:  # a failed step (or bookkeeping) must not end the thread
                log.exception("generation step failed")
                self._fail_running(exc)

    def _admit(self) -> bool:
        """Move queued jobs into the engine by the batching mode (under the lock); wait while there is nothing
        to do. False when the thread should exit."""
        while True:
            if self._stopped:
                return False
            room = self.settings.max_batch - self._engine_rows
            busy = self.engine.has_work()
            if self.settings.batching == "static":
                if busy:
                    return True
                if self._pending:
                    wait = self._pending[0].created + self.settings.batch_wait_s - time.monotonic()
                    rows = sum(job.rows for job in self._pending)
                    if wait > 0 and rows < self.settings.max_batch and not self._closing:
                        self._cond.wait(wait)
                        continue
            while self._pending and (self._pending[0].rows <= room or not (busy or self._engine_rows)):
                job = self._pending.popleft()
                if not self._start(job):
                    continue
                room -= job.rows
                busy = True
            if busy or self._to_cancel:
                return True
            self._cond.wait()

    def _start(self, job: Job) -> bool:
        """Add a job's rows to the engine (under the lock). A job the engine refuses fails alone (its rows
        already added leave again); False then."""
        job.state, job.started = "running", time.monotonic()
        job.row_ids = []
        try:
            for p, prompt in enumerate(job.prompts):
                for s in range(job.n):
                    tag = (job, p * job.n + s)
                    job.row_ids.append(
                        self.engine.add(
                            prompt,
                            job.config,
                            seed=job.config.seed,
                            prompt_index=p,
                            sample_index=s,
                            tag=tag,
                            speculate=job.speculate,
                        )
                    )
        except CpmError as exc:  # e.g. a prompt longer than a TensorRT engine prefills
            log.warning("request refused by the engine: %s", describe(exc))
            for row_id in job.row_ids:
                self.engine.cancel(row_id, "error")
            job.state, job.finished = "done", time.monotonic()
            self.counters["failed"] += 1
            job.post(ErrorEvent(InvalidRequestError(describe(exc), param="prompt")))  # the request's fault: 400
            return False
        self._running.add(job)
        self._engine_rows += job.rows
        return True

    def _dispatch(self, events: list, now: float) -> None:
        tokens = 0
        for event in events:
            job, choice = event.tag
            if isinstance(event, EngineToken):
                tokens += 1
                if job.first_token is None:
                    job.first_token = now
                    if self.metrics is not None:
                        self.metrics.first_token(now - job.created)
                last = self._last_token.get(event.row_id)
                if last is not None and self.metrics is not None:
                    self.metrics.inter_token(now - last)
                self._last_token[event.row_id] = now
                if job.stream and job.state == "running" and (event.text or event.logprob is not None):
                    job.post(TokenEvent(choice, event.text, event.logprob))
            elif isinstance(event, FinishEvent):
                self._last_token.pop(event.row_id, None)
                with self._cond:  # decided under the lock, so a concurrent cancel() sees a finished job as done
                    if job.state != "running":  # cancelled: its handler has its answer already
                        continue
                    job.rows_done += 1
                    if job.rows_done == job.rows:
                        self._finish_locked(job)
                if job.stream and event.text:
                    job.post(TokenEvent(choice, event.text))
                job.post(ChoiceDone(choice, event.result))
        rows = self.engine.live_rows + self.engine.pending_rows
        with self._cond:
            self._engine_rows = rows
            self.counters["generated_tokens"] += tokens
            for job in self._running:
                job.batch_rows = max(job.batch_rows, self.engine.live_rows)
        if self.metrics is not None and tokens:
            self.metrics.generated(tokens)

    def _finish_locked(self, job: Job) -> None:
        job.state, job.finished = "done", time.monotonic()
        self._running.discard(job)
        self.counters["completed"] += 1

    def _fail_running(self, exc: Exception) -> None:
        """A failed step leaves the batch in an unknown state: its requests fail, the engine starts afresh."""
        error = GenerationFailedError(f"generation failed: {describe(exc)}")
        with self._cond:
            jobs = list(self._running)
            self._running.clear()
            if self.draft is not None:  # the new engine numbers its rows from 0 again: the draft keeps none of these
                for row_id in {*(r for job in jobs for r in job.row_ids), *(r for r, _ in self._to_cancel)}:
                    self.draft.forget(row_id)
            self._to_cancel.clear()
            self.engine = self._new_engine()
            self._engine_rows = 0
            self._last_token.clear()  # the new engine numbers its rows from 0 again
            for job in jobs:
                job.state, job.finished = "done", time.monotonic()
                self.counters["failed"] += 1
        for job in jobs:
            job.post(ErrorEvent(error))


def available_memory() -> int | None:
    """Bytes this process could allocate now: Linux's ``MemAvailable``, or less under a cgroup (v2) memory limit;
    None where neither is known."""
    known = []
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii"))
            known.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(known) if known else None
