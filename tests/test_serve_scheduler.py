"""The scheduler without HTTP: continuous vs static admission, FIFO, a request larger than the batch, the queue
bound and cancellation; and generate's per-request seeds and per-row stops."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")

from cpm_infer.backends import load_backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import generate
from cpm_infer.serve.errors import QueueFullError, ShuttingDownError
from cpm_infer.serve.jobs import ChoiceDone, ErrorEvent, TokenEvent
from cpm_infer.serve.scheduler import Scheduler
from cpm_infer.serve.settings import ServeSettings

SAMPLED = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_backend("torch", tiny_checkpoint)


def _prompts(tok):
    return [tok.encode(t) for t in ("滚滚长江东逝水", "话说天下大势", "建宁二年四月望日，帝御温德殿", "白发")]


def test_per_prompt_seeds_sample_as_if_each_prompt_ran_alone(model):
    backend, tok = model
    prompts, seeds = _prompts(tok), [11, 12, 13, 11]
    batched = generate(backend, prompts, SAMPLED, tok, seeds=seeds)
    alone = [generate(backend, [p], SAMPLED.replace(seed=s), tok)[0] for p, s in zip(prompts, seeds, strict=False)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert batched[0].token_ids != batched[3].token_ids  # same seed, other prompt: not a copy
    # Without per-prompt seeds the row index seeds the generator: index_offset alone cannot do this.
    shared_seed = generate(backend, prompts, SAMPLED.replace(seed=11), tok)
    assert shared_seed[1].token_ids != alone[1].token_ids or shared_seed[2].token_ids != alone[2].token_ids


def test_should_stop_drops_one_row_and_leaves_the_others_exact(model):
    backend, tok = model
    prompts = _prompts(tok)
    config = SAMPLED.replace(max_new_tokens=20, ignore_eos=True)
    full = generate(backend, prompts, config, tok, seeds=[1, 2, 3, 4])
    calls: dict[int, int] = {}

    def stop_row_1(index: int) -> str | None:
        calls[index] = calls.get(index, 0) + 1
        return "disconnected" if index == 1 and calls[index] >= 5 else None

    cut = generate(backend, prompts, config, tok, seeds=[1, 2, 3, 4], should_stop=stop_row_1)
    assert cut[1].finish_reason == "disconnected" and cut[1].token_ids == full[1].token_ids[:5]
    for i in (0, 2, 3):
        assert cut[i].token_ids == full[i].token_ids and cut[i].finish_reason == "length"


def _run(scheduler, scenario):
    try:
        return asyncio.run(scenario())
    finally:
        scheduler.close()


async def _results(job):
    results = {}
    while len(results) < job.rows:
        event = await job.next_event()
        assert isinstance(event, ChoiceDone), event
        results[event.choice] = event.result
    return [results[i] for i in range(job.rows)]


LONG = GenerationConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
SHORT = SAMPLED.replace(max_new_tokens=3, seed=5)  # other settings than the long one


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_short_request_joins_the_running_batch_and_leaves_first(model, batching):
    backend, tok = model
    scheduler = Scheduler(backend, tok, ServeSettings(max_batch=4, batch_wait_ms=0, batching=batching))
    # The engine's steps after the first wait until the short request is submitted: however slow this thread is,
    # the long request is still running when the short one arrives.
    submitted, step, steps = threading.Event(), scheduler.engine.step, []

    def gated_step():
        steps.append(1)
        if len(steps) > 1:
            assert submitted.wait(300)
        return step()

    scheduler.engine.step = gated_step

    async def scenario():
        scheduler.start()
        long = scheduler.submit([tok.encode("话说")], LONG, stream=True)
        assert isinstance(await long.next_event(), TokenEvent)  # the long request is generating
        short = scheduler.submit([tok.encode("天下")], SHORT)
        submitted.set()
        result = (await _results(short))[0]
        while not isinstance(await long.next_event(), ChoiceDone):
            pass
        while short.state != "done" or long.state != "done":  # the scheduler marks them just after the event
            await asyncio.sleep(0.01)
        return long, short, result

    long, short, result = _run(scheduler, scenario)
    assert result.token_ids == generate(backend, [tok.encode("天下")], SHORT, tok)[0].token_ids
    if batching == "continuous":
        assert short.finished < long.finished and short.batch_rows == 2
    else:  # it waited for the long request's batch to end
        assert short.started >= long.finished and short.batch_rows == 1


def test_admission_is_fifo_and_a_request_larger_than_the_batch_runs(model):
    backend, tok = model
    scheduler = Scheduler(backend, tok, ServeSettings(max_batch=2, queue_size=8))

    async def scenario():
        big = scheduler.submit([tok.encode("长江")], SAMPLED.replace(num_samples=3, seed=2))
        small = [scheduler.submit([[5 + i]], SAMPLED.replace(max_new_tokens=2)) for i in range(3)]
        scheduler.start()
        results = await _results(big)
        for job in small:
            await _results(job)
        return big, small, results

    big, small, results = _run(scheduler, scenario)
    want = generate(backend, [tok.encode("长江")], SAMPLED.replace(num_samples=3, seed=2), tok)
    assert [r.token_ids for r in results] == [r.token_ids for r in want]
    starts = [job.started for job in [big, *small]]
    assert starts == sorted(starts)  # first come, first admitted


def test_the_queue_is_bounded_and_cancel_frees_the_place(model):
    backend, tok = model
    scheduler = Scheduler(backend, tok, ServeSettings(max_batch=1, queue_size=2))  # not started: all wait

    async def scenario():
        a = scheduler.submit([[5]], SAMPLED)
        scheduler.submit([[6]], SAMPLED)
        with pytest.raises(QueueFullError):
            scheduler.submit([[7]], SAMPLED)
        assert scheduler.cancel(a, "disconnected") and not scheduler.cancel(a, "disconnected")
        assert isinstance(await a.next_event(), ErrorEvent)
        scheduler.submit([[8]], SAMPLED)  # the cancelled request's place is free again
        scheduler.begin_shutdown(grace_s=0)
        with pytest.raises(ShuttingDownError):
            scheduler.submit([[9]], SAMPLED)
        return scheduler.snapshot()

    state = _run(scheduler, scenario)
    assert state["queued"] == 0 and state["closing"]
    assert state["counters"]["rejected_queue_full"] == 1 and state["counters"]["cancelled_disconnected"] == 1
    assert state["counters"]["cancelled_shutdown"] == 2


class _ShortPrefill:
    """The backend with a prefill limit below its context, like a TensorRT engine built with --max-input."""

    def __init__(self, backend, max_prompt: int) -> None:
        self._backend, self.max_prompt = backend, max_prompt

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_a_request_the_engine_refuses_fails_alone_and_the_thread_lives_on(model):
    backend, tok = model
    limited = _ShortPrefill(backend, max_prompt=4)
    scheduler = Scheduler(limited, tok, ServeSettings(max_batch=4))

    async def scenario():
        scheduler.start()
        running = scheduler.submit([tok.encode("话说")[:3]], LONG, stream=True)
        assert isinstance(await running.next_event(), TokenEvent)
        refused = scheduler.submit([list(range(10, 20))], SAMPLED)  # 10 tokens > the engine's 4
        event = await refused.next_event()
        while not isinstance(await running.next_event(), ChoiceDone):
            pass
        later = scheduler.submit([[5, 6]], SAMPLED.replace(max_new_tokens=2))
        return event, await _results(later)

    event, later = _run(scheduler, scenario)
    assert isinstance(event, ErrorEvent) and event.error.status == 400
    assert "at most 4" in str(event.error)
    assert len(later) == 1  # the generation thread still serves
    assert scheduler.counters["failed"] == 1 and scheduler.counters["completed"] == 2


class _Reserving:
    """A torch backend that says what reserve() was asked (the ONNX backend's is tested in test_kv_share)."""

    def __init__(self, backend, size: int) -> None:
        self._backend, self.size, self.asked = backend, size, []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def reserve(self, rows: int, *, dry_run: bool = False) -> int:
        self.asked.append((rows, dry_run))
        return self.size


@pytest.mark.parametrize(
    ("kv_reserve", "batching", "free", "reserved", "asked"),
    [
        ("auto", "continuous", 10_000, 1000, [(4, True), (4, False)]),
        ("auto", "continuous", 1_999, 0, [(4, True)]),  # over half the free memory: grows as needed instead
        ("auto", "continuous", None, 1000, [(4, True), (4, False)]),  # free memory unknown
        ("off", "continuous", 10_000, 0, []),
        ("auto", "static", 10_000, 0, []),
    ],
)
def test_the_kv_cache_is_set_aside_at_warmup_where_it_fits(
    model, monkeypatch, kv_reserve, batching, free, reserved, asked
):
    import cpm_infer.serve.scheduler as scheduler_module

    backend, tok = model
    wrapped = _Reserving(backend, 1000)
    monkeypatch.setattr(scheduler_module, "available_memory", lambda: free)
    scheduler = Scheduler(wrapped, tok, ServeSettings(max_batch=4, kv_reserve=kv_reserve, batching=batching))
    scheduler.warmup()
    assert scheduler.kv_reserved == reserved and wrapped.asked == asked
