"""The prefix cache and chunked prefill: a prompt starts from the longest cached prefix, long prompts are fed a chunk
per step while the running rows decode, and neither changes what any row generates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import HashBackend, HashTok, run

from cpm_infer.backends.base import supports_kv_ops
from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine import Engine, FinishEvent, TokenEvent
from cpm_infer.engine.prefix_cache import PrefixCache

GREEDY = GenerationConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
SAMPLED = GenerationConfig(temperature=0.9, top_p=0.9, max_new_tokens=6, ignore_eos=True, logprobs=2)


class SlotBackend(HashBackend):
    """HashBackend with KvCacheOps and a cache laid out like the real ones: each row is a list of slots (None for
    left padding), changed in place by decode/extend/select/merge/crop as ORT's shared buffer is. Logits are a
    function of a row's real tokens, so a row's tokens depend on nothing else unless the engine mixes up caches
    (a cached entry that the running batch wrote into would change later rows)."""

    name = "slots"

    def prefill(self, ids, mask, pos):
        self.calls.append(("prefill", ids.shape))
        assert (pos[mask == 1] == np.concatenate([np.arange(m.sum()) for m in mask])).all()
        state = [[int(t) if m else None for t, m in zip(r, mr, strict=True)] for r, mr in zip(ids, mask, strict=True)]
        return self._logits(state), state

    def _logits(self, state):
        return np.stack([self._row_logits([t for t in row if t is not None]) for row in state])

    def extend(self, state, ids, mask, pos):
        self.calls.append(("extend", ids.shape))
        assert mask.shape == (len(state), len(state[0]) + ids.shape[1])
        for row, new, p, m in zip(state, ids, pos, mask, strict=True):
            real = sum(t is not None for t in row)
            assert list(p) == list(range(real, real + len(new))) and m[len(row) :].all()
            row.extend(int(t) for t in new)
        return self._logits(state), state

    def decode(self, state, ids, mask, pos):
        return self.extend(state, ids, mask, pos)

    def select(self, state, rows, start=0):
        self.calls.append(("select", len(rows)))
        state[:] = [list(state[i][start:]) for i in rows]
        return state

    def merge(self, state, other):
        self.calls.append(("merge", len(other)))
        width = max(len(state[0]), len(other[0]))
        state[:] = [[None] * (width - len(r)) + r for r in state + other]
        return state

    def crop(self, state, length):
        for row in state:
            del row[length:]
        return state

    def copy_rows(self, state, rows, *, start=0, stop=None, room=0):
        self.calls.append(("copy_rows", len(rows)))
        return [list(state[i][start:stop]) for i in rows]

    def nbytes(self, state):
        return 8 * sum(len(row) for row in state)


def engine(backend=None, cache=None, chunk=0, max_rows=8):
    return Engine(backend or SlotBackend(), HashTok(), max_rows=max_rows, prefix_cache=cache, prefill_chunk=chunk)


def schedule_run(eng, schedule):
    """schedule: (step, prompt, config, seed); returns each seed's finish event."""
    owner, out, step = {}, {}, 0
    while step <= max(at for at, *_ in schedule) or eng.has_work():
        for at, prompt, config, seed in schedule:
            if at == step:
                owner[eng.add(prompt, config, seed=seed)] = seed
        for event in eng.step():
            if isinstance(event, FinishEvent):
                out[owner[event.row_id]] = event
        step += 1
    return out


PREFIX = list(range(8, 48))  # 40 tokens


def test_a_repeated_prefix_is_extended_not_prefilled():
    backend, cache = SlotBackend(), PrefixCache(10_000, min_tokens=16)
    eng = engine(backend, cache)
    first = [*PREFIX, 9, 9, 9]
    got = schedule_run(eng, [(0, first, GREEDY, 1), (3, [*PREFIX, 11, 12], SAMPLED, 2), (5, first, GREEDY, 3)])
    assert backend.calls.count(("extend", (1, 2))) == 1  # the second prompt: only its 2-token tail
    assert backend.calls.count(("extend", (1, 1))) >= 1  # the repeat: its last token (a prefix leaves one)
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", (1, 43))]
    assert [got[s].result.cached_tokens for s in (1, 2, 3)] == [0, 40, 42]
    stats = cache.stats
    assert (stats.lookups, stats.hits, stats.hit_tokens) == (3, 2, 82)
    assert stats.entries == 2 and stats.bytes == 8 * (43 + 42)  # first's prompt and the second's (42 tokens)
    plain = schedule_run(engine(), [(0, first, GREEDY, 1), (3, [*PREFIX, 11, 12], SAMPLED, 2), (5, first, GREEDY, 3)])
    for seed in (1, 2, 3):
        assert got[seed].result.token_ids == plain[seed].result.token_ids
        assert got[seed].result.logprobs == plain[seed].result.logprobs


def test_short_prefixes_and_short_prompts_are_not_reused():
    backend, cache = SlotBackend(), PrefixCache(10_000, min_tokens=16)
    eng = engine(backend, cache)
    run_all(eng, [(PREFIX[:10], 1), (PREFIX[:15], 2)])  # too short to be kept or to reuse a prefix
    assert cache.stats.entries == 0 and cache.stats.lookups == 0
    run_all(eng, [(PREFIX[:20], 4)])
    run_all(eng, [(PREFIX[:14] + [5] * 10, 5)])  # shares 14 < 16 tokens with it
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.entries) == (2, 0, 2)


def run_all(eng, prompts):
    for prompt, seed in prompts:
        eng.add(prompt, GREEDY, seed=seed)
    return run(eng)[0]


def test_entries_are_prefix_free_bounded_in_bytes_and_lru():
    backend = SlotBackend()
    cache = PrefixCache(8 * 80, min_tokens=4)
    a, b, c = [1] * 30, [2] * 30, [3] * 30
    for prompt in (a, b):
        cache.store(backend, prompt, [list(prompt)])
    assert cache.stats.entries == 2 and cache.stats.bytes == 480
    assert not cache.store(backend, a[:10], [a[:10]])  # a prefix of an entry: covered, nothing stored
    assert cache.take(backend, [*a, 5]) is not None  # a is now the most recently used
    cache.store(backend, c, [list(c)])  # 720 bytes > 640: b (least recently used) goes
    assert cache.stats.evictions == 1 and cache.take(backend, [*b, 5]) is None
    cache.store(backend, a + [4] * 10, [a + [4] * 10])  # supersedes a (its prefix), not an eviction
    assert cache.stats.entries == 2 and cache.stats.evictions == 1 and cache.stats.bytes == 8 * 70
    assert not cache.store(backend, [6] * 81, [[6] * 81])  # larger than the whole cache
    state, length = cache.take(backend, a + [4] * 3 + [9])
    assert length == 33 and state == [a + [4] * 3]
    with pytest.raises(ConfigError):
        PrefixCache(-1)


def test_cached_entries_are_copies_the_running_batch_never_writes():
    """The slot backend changes states in place: if an entry were handed out, later rows would see the tokens
    the earlier ones generated in it."""
    backend, cache = SlotBackend(), PrefixCache(10_000, min_tokens=8)
    prompt = PREFIX[:20]
    results = []
    for seed in range(3):
        eng = engine(backend, cache)
        eng.add([*prompt, seed + 1], SAMPLED.replace(max_new_tokens=10), seed=seed)
        results.append(run(eng)[0])
    assert sorted(entry.state for entry in cache._entries.values()) == [[[*prompt, s + 1]] for s in range(3)]
    assert cache.stats.hits == 2
    alone = [run(_added(engine(), [*prompt, s + 1], s))[0] for s in range(3)]
    for got, want in zip(results, alone, strict=True):
        assert [e.result.token_ids for e in got.values()] == [e.result.token_ids for e in want.values()]


def _added(eng, prompt, seed):
    eng.add(prompt, SAMPLED.replace(max_new_tokens=10), seed=seed)
    return eng


def test_long_prompt_is_prefilled_a_chunk_per_step_while_the_batch_decodes():
    backend = SlotBackend()
    eng = engine(backend, chunk=16)
    short = eng.add([9, 10], GREEDY.replace(max_new_tokens=20), seed=0)
    eng.step()
    long_prompt = list(range(8, 48)) + [20] * 10  # 50 tokens: chunks of 16, 16, 16, 2
    late = eng.add(long_prompt, GREEDY, seed=1)
    backend.calls.clear()
    steps = [eng.step() for _ in range(5)]
    for events in steps:  # the running row got a token at every step
        assert [e.row_id for e in events if isinstance(e, TokenEvent)][:1] == [short]
    assert [c for c in backend.calls if c[0] in ("prefill", "extend") and c[1][0] == 1 and c[1][1] > 1] == [
        ("prefill", (1, 16)),
        ("extend", (1, 16)),
        ("extend", (1, 16)),
        ("extend", (1, 2)),
    ]
    assert [e.row_id for e in steps[3] if isinstance(e, TokenEvent)] == [short]  # prefilled, joins next step
    assert [e.row_id for e in steps[4] if isinstance(e, TokenEvent)] == [short, late]  # joined with its token
    assert eng.pending_rows == 0 and eng.live_rows == 2


def test_prefill_budget_is_shared_oldest_first_and_unlimited_with_nothing_running():
    backend = SlotBackend()
    eng = engine(backend, chunk=16)
    first, second = list(range(8, 28)), list(range(28, 48))  # 20 tokens each
    a = eng.add(first, GREEDY, seed=0)
    b = eng.add(second, GREEDY, seed=1)
    events = eng.step()  # nothing running: both whole, and both join at once
    assert sorted(e.row_id for e in events if isinstance(e, TokenEvent)) == [a, b]
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", (1, 20)), ("prefill", (1, 20))]
    backend.calls.clear()
    c = eng.add([*first, 30], GREEDY, seed=2)  # rows running: 16 prompt tokens a step, oldest job first
    d = eng.add([*second, 31], GREEDY, seed=3)
    steps = [eng.step() for _ in range(5)]
    fed = [(c[0], c[1][1]) for c in backend.calls if c[0] in ("prefill", "extend") and c[1][0] == 1]
    assert fed == [("prefill", 16), ("extend", 5), ("prefill", 11), ("extend", 10)]  # step 2 only joins c
    joined = [[e.row_id for e in events if isinstance(e, TokenEvent) and e.row_id in (c, d)] for events in steps]
    assert joined[:3] == [[], [], [c]] and joined[4][-1:] == [d] and d not in joined[3]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([1, 1, 2, 3, 0]),  # which shared prefix (0: none)
            st.lists(st.integers(8, 47), min_size=1, max_size=12),  # tail
            st.integers(0, 2**16),  # seed
            st.integers(0, 8),  # step at which it joins
            st.sampled_from([1, 3]),  # n samples (identical prompts share one prefill)
            st.booleans(),  # cancelled two steps after joining
        ),
        min_size=2,
        max_size=7,
    ),
    max_rows=st.integers(1, 6),
    chunk=st.sampled_from([0, 5, 16]),
    cache_bytes=st.sampled_from([0, 8 * 60, 10_000]),  # off, room for about one entry, plenty
)
def test_outputs_do_not_depend_on_cache_chunks_or_batch(rows, max_rows, chunk, cache_bytes):
    prefixes = {0: [], 1: PREFIX[:20], 2: PREFIX[:30], 3: PREFIX[5:30]}
    cache = PrefixCache(cache_bytes, min_tokens=6)
    eng = engine(SlotBackend(), cache, chunk=chunk, max_rows=max_rows)
    owner, finished, cancel_at, step = {}, {}, {}, 0
    while step <= 10 or eng.has_work():
        for i, (prefix, tail, seed, at, n, cancel) in enumerate(rows):
            if at == step:
                for s in range(n):
                    row = eng.add(prefixes[prefix] + tail, SAMPLED, seed=seed, sample_index=s)
                    owner[row] = (i, s)
                    if cancel:
                        cancel_at[row] = step + 2
        for row, when in cancel_at.items():
            if when == step:
                eng.cancel(row, "gone")
        for event in eng.step():
            if isinstance(event, FinishEvent):
                finished[owner[event.row_id]] = event
        step += 1
    assert len(finished) == sum(n for *_, n, _ in rows)
    for i, (prefix, tail, seed, _, n, _) in enumerate(rows):
        for s in range(n):
            got = finished[(i, s)]
            if got.reason == "gone":
                continue
            solo = engine(max_rows=1)
            solo.add(prefixes[prefix] + tail, SAMPLED, seed=seed, sample_index=s)
            (want,) = run(solo)[0].values()
            assert got.result.token_ids == want.result.token_ids
            assert got.result.logprobs == want.result.logprobs
    assert cache.stats.bytes <= cache_bytes


def test_cancelling_a_row_while_its_prompt_is_chunked():
    backend = SlotBackend()
    eng = engine(backend, chunk=8)
    eng.add([5, 6], GREEDY.replace(max_new_tokens=30), seed=9)  # running: the prompts below go in chunks
    eng.step()
    keep = eng.add(list(range(8, 40)), GREEDY, seed=0)
    gone = eng.add([*range(8, 40), 3], GREEDY, seed=1)
    eng.step()
    assert eng.pending_rows == 2 and eng.live_rows == 1
    eng.cancel(gone, "disconnected")
    finished, _ = run(eng)
    assert finished[gone].reason == "disconnected" and finished[gone].result.token_ids == []
    solo = engine(max_rows=1)
    solo.add(list(range(8, 40)), GREEDY, seed=0)
    assert finished[keep].result.token_ids == next(iter(run(solo)[0].values())).result.token_ids


def test_backends_without_kv_ops_prefill_whole_prompts():
    """A backend without KvCacheOps (TensorRT) gets neither a cache nor chunks: one prefill of all newcomers."""
    backend = HashBackend()
    assert not supports_kv_ops(backend)
    eng = Engine(backend, HashTok(), prefix_cache=PrefixCache(), prefill_chunk=4)
    assert eng.prefix_cache is None and eng.prefill_chunk == 0
    run_all(eng, [(PREFIX, 1), ([*PREFIX, 3], 2)])
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", 2)]
    assert supports_kv_ops(SlotBackend())
    assert Engine(SlotBackend(), HashTok()).prefix_cache is not None  # the backend's shared cache by default


# -- the server -------------------------------------------------------------------------------------
def test_server_reports_cached_tokens_and_cache_metrics(tiny_checkpoint):
    """usage.prompt_tokens_details.cached_tokens as OpenAI reports it; /metrics counts lookups, hits, tokens, bytes;
    the completion is what the same request gives with the cache off."""
    from test_serve import request

    from cpm_infer.backends import load_backend
    from cpm_infer.prompts import encode
    from cpm_infer.serve.app import create_app
    from cpm_infer.serve.server import BackgroundServer
    from cpm_infer.serve.settings import ServeSettings

    backend, tok = load_backend("torch", tiny_checkpoint)
    long_text = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"
    body = {"max_tokens": 5, "temperature": 0, "prompt": long_text + "汉朝自高祖"}
    again = {**body, "prompt": long_text + "桓帝禁锢善类", "n": 2}
    ids = [encode(tok, p).ids for p in (body["prompt"], again["prompt"])]  # as the server prepares them
    common = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    texts = {}
    for mb in (0, 64):
        app = create_app(backend, tok, ServeSettings(prefix_cache_mb=mb, prefill_chunk=16), warmup=False)
        with BackgroundServer(app) as srv:
            status, first = request(srv, "POST", "/v1/completions", body)
            assert status == 200 and "prompt_tokens_details" not in first["usage"]
            status, second = request(srv, "POST", "/v1/completions", again)
            assert status == 200
            texts[mb] = [c["text"] for c in first["choices"] + second["choices"]]
            metrics = urllib_get(srv, "/metrics")
        if mb:
            assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": common}  # once for n = 2
            assert "cpm_prefix_cache_hits_total 1.0" in metrics and "cpm_prefix_cache_lookups_total 2.0" in metrics
            assert f"cpm_prefix_cache_cached_tokens_total {float(common)}" in metrics
            assert "cpm_prefix_cache_bytes 0.0" not in metrics and "cpm_prefix_cache_entries 2.0" in metrics
        else:
            assert "prompt_tokens_details" not in second["usage"] and "cpm_prefix_cache" not in metrics
    assert texts[0] == texts[64]


def urllib_get(srv, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(srv.url + path, timeout=30) as response:
        return response.read().decode()
