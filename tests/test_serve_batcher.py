"""The pieces `cpm serve` batches with, without HTTP: per-request seeds and per-row stops in
`generate`, and the batcher's grouping, queue bound and cancellation."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from cpm_infer.backends import load_backend
from cpm_infer.config import GenerationConfig
from cpm_infer.generate import generate
from cpm_infer.serve.batcher import Batcher
from cpm_infer.serve.errors import QueueFullError, ShuttingDownError
from cpm_infer.serve.jobs import ChoiceDone, ErrorEvent
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


def test_batcher_groups_equal_settings_and_keeps_fifo(model):
    backend, tok = model
    batcher = Batcher(backend, tok, ServeSettings(max_batch=4, batch_wait_ms=300, queue_size=8))

    async def scenario():
        greedy = GenerationConfig(max_new_tokens=4, temperature=0)
        jobs = [
            batcher.submit([tok.encode("话说")], SAMPLED.replace(seed=1)),
            batcher.submit([tok.encode("天下")], greedy),
            batcher.submit([tok.encode("长江")], SAMPLED.replace(seed=2)),
        ]
        batcher.start()
        events = [await job.next_event() for job in jobs]
        return events, [job.batch_rows for job in jobs]

    try:
        events, rows = asyncio.run(scenario())
    finally:
        batcher.close()
    assert all(isinstance(e, ChoiceDone) for e in events)
    assert rows == [2, 1, 2]  # the two sampled requests shared a batch
    assert (
        events[0].result.token_ids == generate(backend, [tok.encode("话说")], SAMPLED.replace(seed=1), tok)[0].token_ids
    )


def test_batcher_refuses_when_full_and_cancel_frees_the_place(model):
    backend, tok = model
    batcher = Batcher(backend, tok, ServeSettings(max_batch=1, queue_size=2))  # worker not started: all wait

    async def scenario():
        a = batcher.submit([[5]], SAMPLED)
        batcher.submit([[6]], SAMPLED)
        with pytest.raises(QueueFullError):
            batcher.submit([[7]], SAMPLED)
        assert batcher.cancel(a, "disconnected") and not batcher.cancel(a, "disconnected")
        assert isinstance(await a.next_event(), ErrorEvent)
        batcher.submit([[8]], SAMPLED)  # the cancelled request's place is free again
        batcher.begin_shutdown(grace_s=0)
        with pytest.raises(ShuttingDownError):
            batcher.submit([[9]], SAMPLED)
        return batcher.snapshot()

    state = asyncio.run(scenario())
    batcher.close()
    assert state["queued"] == 0 and state["closing"]
    assert state["counters"]["rejected_queue_full"] == 1 and state["counters"]["cancelled_disconnected"] == 1
    assert state["counters"]["cancelled_shutdown"] == 2
