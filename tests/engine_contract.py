"""The engine checks every backend must pass (torch, ORT in each KV mode, TensorRT on the simulation).

Rows joining a running batch, rows leaving it (finished, cancelled, cut padding) and repeated rows
(beam search) must not change what a row generates: its tokens equal those it gets running alone.
"""

from __future__ import annotations

import numpy as np

from cpm_infer.config import GenerationConfig
from cpm_infer.engine import Engine, FinishEvent, TokenEvent
from cpm_infer.engine.generate import generate

PROMPTS = ("滚滚长江东逝水", "话说天下大势，分久必合", "白发", "青山依旧在，几度夕阳红。")
GREEDY = GenerationConfig(temperature=0, max_new_tokens=10, ban_unk=False, ignore_eos=True)
SAMPLED = GenerationConfig(temperature=0.9, top_k=30, top_p=0.9, max_new_tokens=10, ignore_eos=True)


def alone(backend, tok, prompt, config, seed):
    return generate(backend, [prompt], config, tok, seeds=[seed])[0].token_ids


def run_schedule(backend, tok, schedule, max_rows=8, **engine_options):
    """schedule: list of (step to add at, prompt, config, seed). Returns {seed: token ids}."""
    return {
        seed: result.token_ids
        for seed, result in run_results(backend, tok, schedule, max_rows, **engine_options).items()
    }


def run_results(backend, tok, schedule, max_rows=8, **engine_options):
    """As ``run_schedule``, each seed's whole GenerationResult."""
    engine = Engine(backend, tok, max_rows=max_rows, **engine_options)
    owner, out, step = {}, {}, 0
    while step <= max(s for s, *_ in schedule) or engine.has_work():
        for at, prompt, config, seed in schedule:
            if at == step:
                owner[engine.add(prompt, config, seed=seed)] = seed
        for event in engine.step():
            if isinstance(event, FinishEvent):
                out[owner[event.row_id]] = event.result
        step += 1
    return out


def check_join_while_running(backend, tok):
    prompts = [tok.encode(p) for p in PROMPTS]
    schedule = [
        (0, prompts[0], GREEDY, 1),
        (0, prompts[1], SAMPLED, 2),
        (3, prompts[2], SAMPLED.replace(max_new_tokens=4), 3),  # joins, leaves first
        (5, prompts[3], GREEDY.replace(max_new_tokens=12), 4),  # joins later, outlives the others
    ]
    got = run_schedule(backend, tok, schedule)
    for _, prompt, config, seed in schedule:
        assert got[seed] == alone(backend, tok, prompt, config, seed), f"row with seed {seed}"


def check_cancel_frees_the_row(backend, tok):
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    engine = Engine(backend, tok, max_rows=2)
    ids = [engine.add(p, GREEDY, seed=i) for i, p in enumerate(prompts)]
    engine.step()
    assert engine.live_rows == 2 and engine.pending_rows == 1
    engine.cancel(ids[0], "gone")
    events = engine.step()  # the cancelled row leaves; the pending one takes its place
    finished = [e for e in events if isinstance(e, FinishEvent)]
    assert [(e.row_id, e.reason) for e in finished] == [(ids[0], "gone")]
    assert engine.live_rows == 2 and engine.pending_rows == 0
    assert not any(isinstance(e, TokenEvent) and e.row_id == ids[0] for e in events)
    results = {}
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, FinishEvent):
                results[event.row_id] = event.result.token_ids
    assert results[ids[1]] == alone(backend, tok, prompts[1], GREEDY, 1)
    assert results[ids[2]] == alone(backend, tok, prompts[2], GREEDY, 2)


def check_repeated_rows(backend, tok):
    """select with repeated rows (beam search) gives each copy the same next logits."""
    from cpm_infer.engine.batch import DecodeBatch

    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    logits, batch = DecodeBatch.prefill(backend, prompts, tok.pad_id)
    first = logits.argmax(-1)
    batch.select(backend, [1, 0, 1])
    out = batch.decode(backend, [first[1], first[0], first[1]])
    np.testing.assert_allclose(out[0], out[2], atol=1e-5)
    _, single = DecodeBatch.prefill(backend, [prompts[1]], tok.pad_id)
    want = single.decode(backend, [first[1]])
    np.testing.assert_allclose(out[0], want[0], atol=1e-4, rtol=1e-4)


LONG = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"


def check_prefix_cache_and_chunks(backend, tok):
    """With a prefix cache and chunked prefill (8 tokens a step) rows generate the greedy tokens they generate
    without, with each token's log-probability within 1e-4: a prompt repeated, one sharing all but its tail,
    joining while others decode or prefill."""
    from cpm_infer.engine.prefix_cache import PrefixCache

    base = tok.encode(LONG)  # 77 tokens with the tiny vocabulary
    config = GREEDY.replace(logprobs=0, max_new_tokens=6)
    schedule = [
        (0, base + tok.encode("汉朝自高祖"), config, 1),
        (1, tok.encode(PROMPTS[2]), config, 2),  # short: prefilled whole while the first is chunked
        (12, base[:-4] + tok.encode("桓帝禁锢善类"), config, 3),  # reuses 73 tokens
        (13, base + tok.encode("汉朝自高祖"), config.replace(max_new_tokens=3), 4),  # the whole prompt but its last
        (13, base[:40], config, 5),  # a prefix of a cached prompt
    ]
    cache = PrefixCache(2**30, min_tokens=8)
    got = run_results(backend, tok, schedule, prefix_cache=cache, prefill_chunk=8)
    want = run_results(backend, tok, schedule, prefix_cache=None)
    assert [got[seed].cached_tokens for seed in range(1, 6)] == [0, 0, 73, 84, 39]
    assert cache.stats.hits == 3
    for seed, result in want.items():
        assert got[seed].token_ids == result.token_ids, f"row with seed {seed}"
        np.testing.assert_allclose(
            [step.logprob for step in got[seed].logprobs], [step.logprob for step in result.logprobs], atol=1e-4
        )


def check_all(backend, tok):
    from cpm_infer.backends.base import supports_kv_ops

    check_join_while_running(backend, tok)
    check_cancel_frees_the_row(backend, tok)
    check_repeated_rows(backend, tok)
    if supports_kv_ops(backend):  # others keep whole prefills (the fallback: tests/test_prefix_cache.py)
        check_prefix_cache_and_chunks(backend, tok)
