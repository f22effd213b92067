"""Run runners over sweeps of cases on identical inputs, with warm-up and repeats, and collect metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from cpm_infer.bench.runners import Runner
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)


class BenchError(CpmError):
    """An impossible sweep (beyond the context) or unusable inputs."""


class GpuPeak(Protocol):
    """Peak GPU memory of one runner: ``reset()`` before a measurement, ``read()`` (MiB) after it."""

    def reset(self) -> None: ...

    def read(self) -> float: ...


@dataclass(frozen=True)
class Case:
    batch: int
    prompt_len: int
    new_tokens: int
    sweep: str  # "base" | "batch" | "prompt" | "new_tokens" | "context"


@dataclass
class Measurement:
    backend: str
    batch: int
    prompt_len: int
    new_tokens: int
    sweep: str
    ttft_ms: float
    decode_p50_ms: float
    decode_p90_ms: float
    decode_mean_ms: float
    tokens_per_s: float
    peak_rss_mb: float
    gpu_peak_mb: float | None
    repeats: int
    gb_per_s: float | None = None  # weights + KV bytes read per decode step / p50 step time
    sampling: str = "greedy"  # the runner's sampling mode (runners.Sampling label)
    acceptance: float | None = None  # speculative decoding: proposed tokens the target accepted
    tokens_per_pass: float | None = None  # and tokens made per target pass (verify or plain decode)

    def to_dict(self) -> dict:
        return asdict(self)


def build_cases(
    *,
    batches: Sequence[int],
    prompt_lens: Sequence[int],
    new_tokens: Sequence[int],
    contexts: Sequence[int],
    n_positions: int,
    context_new_tokens: int = 8,
) -> list[Case]:
    """The base case (first value of each list) plus a one-dimensional sweep along each list."""
    for name, values in (("batch", batches), ("prompt length", prompt_lens), ("new tokens", new_tokens)):
        if not values or any(v < 1 for v in values):
            raise BenchError(f"{name} values must be positive integers, got {list(values)}")
    if any(c < 1 for c in contexts):
        raise BenchError(f"context values must be positive integers, got {list(contexts)}")
    b0, p0, n0 = batches[0], prompt_lens[0], new_tokens[0]
    cases = [Case(b0, p0, n0, "base")]
    cases += [Case(b, p0, n0, "batch") for b in batches[1:]]
    cases += [Case(b0, p, n0, "prompt") for p in prompt_lens[1:]]
    cases += [Case(b0, p0, n, "new_tokens") for n in new_tokens[1:]]
    cases += [Case(1, c, context_new_tokens, "context") for c in contexts]
    for case in cases:
        if case.prompt_len + case.new_tokens > n_positions:
            raise BenchError(
                f"prompt {case.prompt_len} + new tokens {case.new_tokens} exceeds the model's context of "
                f"{n_positions} ({case.sweep} sweep)"
            )
    return cases


def make_prompts(case: Case, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Random token ids (the same for every backend): content does not change the work done."""
    rng = np.random.default_rng([seed, case.batch, case.prompt_len])
    return rng.integers(10, vocab_size, size=(case.batch, case.prompt_len), dtype=np.int64)


class RssSampler:
    """Peak resident memory of this process while a block runs (sampled every 5 ms from /proc)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open(f"/proc/{os.getpid()}/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.current())
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self.peak_bytes = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current())


def measure(
    runner: Runner,
    case: Case,
    prompts: np.ndarray,
    *,
    repeats: int,
    warmup: int = 1,
    gpu_peak: GpuPeak | None = None,
) -> Measurement:
    """Time ``repeats`` runs of one case after ``warmup`` untimed runs. ``gpu_peak`` (only for runners whose
    GPU memory it can see) is reset before the timed runs and read after them."""
    for _ in range(warmup):
        runner.run(prompts, min(case.new_tokens, 4))
    if gpu_peak is not None:
        gpu_peak.reset()
    ttft, steps, totals, produced = [], [], [], 0
    proposed = accepted = emitted = passes = 0
    with RssSampler() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            timing = runner.run(prompts, case.new_tokens)
            totals.append(time.perf_counter() - start)
            ttft.append(timing.first_token_s)
            steps.extend(timing.step_s)
            produced += timing.new_tokens
            if timing.speculation is not None:
                spec = timing.speculation
                proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
                # every decode step not speculated was one pass for one token of the row
                plain = len(timing.step_s) - spec.emitted
                emitted, passes = emitted + spec.emitted + plain, passes + spec.passes + plain
    step_ms = np.asarray(steps) * 1000 if steps else np.asarray([np.nan])
    p50 = float(np.percentile(step_ms, 50))
    traffic = getattr(runner, "traffic", None)
    # The mean past length over the decode steps: prompt, then one more token per step.
    moved = traffic(case.batch, case.prompt_len + case.new_tokens / 2) if traffic is not None else None
    return Measurement(
        backend=runner.name,
        batch=case.batch,
        prompt_len=case.prompt_len,
        new_tokens=case.new_tokens,
        sweep=case.sweep,
        ttft_ms=float(np.median(ttft) * 1000),
        decode_p50_ms=p50,
        decode_p90_ms=float(np.percentile(step_ms, 90)),
        decode_mean_ms=float(np.mean(step_ms)),
        tokens_per_s=float(produced / sum(totals)),
        peak_rss_mb=rss.peak_bytes / 2**20,
        gpu_peak_mb=gpu_peak.read() if gpu_peak is not None else None,
        repeats=repeats,
        gb_per_s=moved / p50 / 1e6 if moved and steps else None,
        sampling=getattr(getattr(runner, "sampling", None), "label", "greedy"),
        acceptance=accepted / proposed if proposed else None,
        tokens_per_pass=emitted / passes if passes else None,
    )
