"""The engine: rows join and leave a running batch, per-row settings, events; and every backend's
join/leave/repeat support (the engine contract, tests/engine_contract.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from engine_contract import check_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpm_infer.config import ConfigError, GenerationConfig, ModelSpec
from cpm_infer.engine import Engine, FinishEvent, TokenEvent
from cpm_infer.engine.generate import generate

V = 48


class HashTok:
    eod_id, unk_id, pad_id, sep_id = 7, 0, 5, 4
    vocab_size = V

    def decode(self, ids):
        return "".join(chr(0x4E00 + i) for i in ids)


class HashBackend:
    """Logits of a row are a fixed function of that row's own tokens (prompt + generated): what a
    row gets cannot depend on its batch, padding or join time unless the engine mixes rows up."""

    name = "hash"

    def __init__(self, n_positions: int = 96) -> None:
        self.spec = ModelSpec(n_layer=1, n_head=1, n_embd=4, vocab_size=V, n_positions=n_positions)
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def _row_logits(history):
        digest = hashlib.blake2b(np.asarray(history, dtype=np.int64).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return (rng.standard_normal(V) * 2.0).astype(np.float32)

    def _logits(self, state):
        return np.stack([self._row_logits(h) for h in state])

    def prefill(self, ids, mask, pos):
        self.calls.append(("prefill", len(ids)))
        assert (pos[mask == 1] == np.concatenate([np.arange(m.sum()) for m in mask])).all()
        state = [[int(t) for t, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(ids, mask, strict=True)]
        return self._logits(state), state

    def decode(self, state, ids, mask, pos):
        self.calls.append(("decode", len(ids)))
        assert mask.shape[0] == len(state) and (mask.sum(axis=1) == [len(h) + 1 for h in state]).all()
        assert (pos[:, 0] == [len(h) for h in state]).all()
        state = [[*h, int(t)] for h, t in zip(state, ids[:, 0], strict=True)]
        return self._logits(state), state

    def select(self, state, rows, start=0):
        self.calls.append(("select", len(rows)))
        return [list(state[i]) for i in rows]

    def merge(self, state, other):
        self.calls.append(("merge", len(other)))
        return state + other


def run(engine: Engine, events=()) -> tuple[dict[int, FinishEvent], dict[int, str]]:
    """Step until done; the finish events and the streamed text of each row (``events``: earlier ones)."""
    finished, streamed = {}, {}
    pending = list(events)
    while pending or engine.has_work():
        for event in pending or engine.step():
            streamed[event.row_id] = streamed.get(event.row_id, "") + event.text
            if isinstance(event, FinishEvent):
                finished[event.row_id] = event
        pending = []
    return finished, streamed


def test_rows_join_a_running_batch_and_leave_it():
    backend = HashBackend()
    engine = Engine(backend, HashTok(), max_rows=4)
    config = GenerationConfig(temperature=0.8, max_new_tokens=6, seed=None)
    a = engine.add([10, 11, 12], config, seed=1)
    seen = engine.step() + engine.step()
    b = engine.add([20], config.replace(max_new_tokens=9), seed=2)
    events = engine.step()
    assert engine.live_rows == 2 and [c for c, _ in backend.calls].count("merge") == 1
    assert {e.row_id for e in events if isinstance(e, TokenEvent)} == {a, b}
    finished, streamed = run(engine, seen + events)
    assert {finished[a].reason, finished[b].reason} == {"length"}
    for row, prompt, n in ((a, [10, 11, 12], 6), (b, [20], 9)):
        want = generate(backend, [prompt], config.replace(max_new_tokens=n), HashTok(), seeds=[row + 1])[0]
        assert finished[row].result.token_ids == want.token_ids
        assert streamed[row] == finished[row].result.text == want.text
    assert engine.live_rows == 0 and not engine.has_work()


def test_max_rows_queues_newcomers_until_a_row_leaves():
    backend = HashBackend()
    engine = Engine(backend, HashTok(), max_rows=2)
    config = GenerationConfig(temperature=0, ignore_eos=True)
    rows = [engine.add([30 + i], config.replace(max_new_tokens=2 + i), seed=0) for i in range(3)]
    engine.step()
    assert (engine.live_rows, engine.pending_rows) == (2, 1)
    events = engine.step()  # row 0 produces its 2nd token and leaves; row 2 takes its place at once
    assert [e.row_id for e in events if isinstance(e, FinishEvent)] == [rows[0]]
    assert (engine.live_rows, engine.pending_rows) == (2, 0)
    assert [c for c, _ in backend.calls] == ["prefill", "decode", "select", "prefill", "merge"]
    finished, _ = run(engine)
    assert set(finished) == set(rows[1:])
    assert [len(finished[r].result.token_ids) for r in rows[1:]] == [3, 4]


def test_cancel_pending_and_running_rows():
    backend = HashBackend()
    engine = Engine(backend, HashTok(), max_rows=1)
    config = GenerationConfig(temperature=0, max_new_tokens=50, ignore_eos=True)
    running, waiting = engine.add([40], config, seed=0), engine.add([41], config, seed=0)
    engine.step()
    engine.cancel(waiting, "timeout")
    engine.cancel(running, "disconnected")
    events = engine.step()
    reasons = {e.row_id: e.reason for e in events if isinstance(e, FinishEvent)}
    assert reasons == {waiting: "timeout", running: "disconnected"}
    assert not [e for e in events if isinstance(e, TokenEvent)]
    assert engine.live_rows == 0 and not engine.has_work()
    assert backend.calls[-1][0] == "prefill"  # no decode ran for the cancelled row


def test_padding_that_no_row_needs_is_cut_when_rows_leave():
    class Recording(HashBackend):
        def select(self, state, rows, start=0):
            self.starts.append(start)
            return super().select(state, rows, start)

    backend = Recording()
    backend.starts = []
    engine = Engine(backend, HashTok(), max_rows=2)
    long_prompt = list(range(10, 40))
    engine.add(long_prompt, GenerationConfig(temperature=0, max_new_tokens=2, ignore_eos=True), seed=0)
    engine.add([9], GenerationConfig(temperature=0, max_new_tokens=20, ignore_eos=True), seed=0)
    engine.step()
    engine.step()  # the long row leaves: its 29 columns of padding in the short row go too
    assert backend.starts == [29] and engine._batch.width == 2  # its prompt + its first token


def test_rows_with_one_prompt_prefill_it_once_and_sample_as_if_alone():
    backend = HashBackend()
    config = GenerationConfig(temperature=0.9, max_new_tokens=6, num_samples=4, seed=3, ignore_eos=True)
    results = generate(backend, [[1, 2, 3], [4, 5], [1, 2, 3]], config, HashTok())
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", 2)]  # 12 rows, 2 distinct prompts
    assert ("select", 12) in backend.calls  # the cache forked into one row per sample
    for result in results:
        prompt = [[1, 2, 3], [4, 5], [1, 2, 3]][result.prompt_index]
        engine = Engine(HashBackend(), HashTok())
        engine.add(prompt, config, seed=3, prompt_index=result.prompt_index, sample_index=result.sample_index)
        (alone,) = run(engine)[0].values()
        assert alone.result.token_ids == result.token_ids
    assert len({tuple(r.token_ids) for r in results}) > 3  # the samples differ


def test_beam_configs_are_refused_by_the_engine():
    engine = Engine(HashBackend(), HashTok())
    with pytest.raises(ConfigError, match="beam"):
        engine.add([1], GenerationConfig(temperature=0, num_beams=2), seed=0)


# -- a row's tokens do not depend on its batch ----------------------------------------------------
row_settings = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.7]),
        "top_k": st.sampled_from([0, 1, 5, 20]),
        "top_p": st.sampled_from([1.0, 0.9, 0.5, 0.05]),
        "repetition_penalty": st.sampled_from([1.0, 1.3, 0.8]),
        "presence_penalty": st.sampled_from([0.0, 1.5, -0.5]),
        "frequency_penalty": st.sampled_from([0.0, 0.7, -1.0]),
        "no_repeat_ngram_size": st.sampled_from([0, 1, 2, 3]),
        "banned_ids": st.lists(st.integers(0, V - 1), max_size=4).map(tuple),
        "min_new_tokens": st.integers(0, 3),
        "max_new_tokens": st.integers(3, 12),
        "stop_strings": st.sampled_from([(), (chr(0x4E00 + 9),), (chr(0x4E00 + 3) + chr(0x4E00 + 4),)]),
        "logprobs": st.sampled_from([None, 0, 3]),
    }
)
rows_strategy = st.lists(
    st.tuples(
        row_settings,
        st.lists(st.integers(8, V - 1), min_size=1, max_size=6),  # prompt
        st.integers(0, 2**16),  # seed
        st.integers(0, 6),  # step at which it joins
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, max_rows=st.integers(1, 5))
def test_a_rows_output_does_not_depend_on_its_batch(rows, max_rows):
    backend, tok = HashBackend(), HashTok()
    engine = Engine(backend, tok, max_rows=max_rows)
    owner, step = {}, 0
    finished: dict[int, FinishEvent] = {}
    while step <= 6 or engine.has_work():
        for i, (values, prompt, seed, at) in enumerate(rows):
            if at == step:
                owner[engine.add(prompt, GenerationConfig(**values), seed=seed)] = i
        for event in engine.step():
            if isinstance(event, FinishEvent):
                finished[owner[event.row_id]] = event
        step += 1
    for i, (values, prompt, seed, _) in enumerate(rows):
        solo = Engine(backend, tok, max_rows=1)
        solo.add(prompt, GenerationConfig(**values), seed=seed)
        (want,) = [e for e in run(solo)[0].values()]
        got = finished[i]
        assert got.result.token_ids == want.result.token_ids
        assert (got.reason, got.result.text) == (want.reason, want.result.text)
        assert got.result.logprobs == want.result.logprobs


# -- every backend ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tok(tiny_vocab):
    from cpm_infer.tokenizer import CpmTokenizer

    return CpmTokenizer(tiny_vocab)


def test_engine_contract_torch(tiny_checkpoint, tiny_tok):
    from cpm_infer.backends import load_backend

    backend, _ = load_backend("torch", tiny_checkpoint)
    check_all(backend, tiny_tok)


@pytest.fixture(scope="module")
def onnx_dirs(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("engine-onnx")
    return {
        "plain": export_onnx(tiny_checkpoint, root / "plain").path,
        "shared": export_onnx(tiny_checkpoint, root / "shared", optimize=True).path,
    }


@pytest.mark.parametrize(
    ("graph", "io_binding", "on_device"),
    [("plain", False, False), ("plain", True, False), ("plain", True, True), ("shared", True, False)],
)
def test_engine_contract_ort(onnx_dirs, tiny_tok, graph, io_binding, on_device):
    """Host arrays, host IO-binding buffers, device-resident buffers (OrtValues; rows cut and joined by
    small ORT graphs: the CUDA code path, bound on the CPU here) and the shared in-place buffer."""
    from cpm_infer.backends.ort_backend import load

    backend, _ = load(onnx_dirs[graph], io_binding=io_binding)
    backend._device_buffers = on_device
    assert backend.kv_shared == (graph == "shared")
    check_all(backend, tiny_tok)


def test_fill_holes_moves_one_kept_row_per_freed_slot():
    import itertools

    from cpm_infer.engine.core import fill_holes

    for size in range(7):
        for keep in itertools.chain.from_iterable(itertools.combinations(range(size), k) for k in range(size + 1)):
            order = fill_holes(list(keep))
            assert sorted(order) == list(keep)  # the same rows
            moved = [j for j, row in enumerate(order) if row != j]
            assert all(j not in keep for j in moved)  # only freed slots are written
            assert len(moved) == sum(row >= len(keep) for row in keep)
