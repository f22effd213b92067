"""Speculative decoding: whatever the draft proposes, the output is the target's.

Greedy rows: token for token the output without a draft (any draft, any k, rows joining and leaving). Sampled
rows: the same distribution, checked by chi-square over 20,000 draws against the exact distribution enumerated
from the target (a deliberately poor draft, so most proposals are rejected and the residual draws matter).
Rollback: after speculative steps the target's cache equals a fresh prefill of the row's tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest
from engine_contract import run_schedule
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import HashTok, V
from test_prefix_cache import SlotBackend

from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine import Engine
from cpm_infer.engine.chooser import RowChooser
from cpm_infer.engine.processors import static_bans
from cpm_infer.engine.speculative import (
    Acceptance,
    DraftMismatchError,
    ModelDraft,
    NgramDraft,
    StepClock,
    check_compatible,
    lookup,
    share_cores,
)


class VerifyingBackend(SlotBackend):
    """SlotBackend with ``extend_all``: the logits after each new token. ``salt`` makes another model (a draft
    whose distributions differ from the target's everywhere)."""

    def __init__(self, salt: int = 0, n_positions: int = 96) -> None:
        super().__init__(n_positions)
        self.salt = salt

    def _row_logits(self, history):
        key = np.asarray([*history, self.salt], dtype=np.int64) if self.salt else np.asarray(history, np.int64)
        digest = hashlib.blake2b(key.tobytes(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return (rng.standard_normal(V) * 2.0).astype(np.float32)

    def extend_all(self, state, ids, mask, pos):
        before = [[t for t in row if t is not None] for row in state]
        self.extend(state, ids, mask, pos)
        return np.stack(
            [
                np.stack([self._row_logits(real + [int(t) for t in new[: i + 1]]) for i in range(len(new))])
                for real, new in zip(before, ids, strict=True)
            ]
        ), state


def test_lookup_proposes_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 3) == [4, 5, 1]  # the latest "1 2" is followed by 4 5 1
    assert lookup([1, 2, 3, 4, 2, 3], 5) == [4, 2, 3]  # longest n-gram first: "2 3"
    assert lookup([1, 2, 3], 4) == []  # no earlier occurrence of 3
    assert lookup([5], 4) == []


def test_acceptance_adapts_k_and_switches_a_hopeless_row_off():
    spec = Acceptance(k=3, max_k=5, window=8)
    spec.record(3, 3)
    assert spec.k == 4
    spec.record(4, 1)
    assert spec.k == 3
    ks = []
    while spec.k:
        spec.record(spec.k, 0)  # nothing accepted
        ks.append(spec.k)
    assert ks[:2] == [2, 1] and set(ks[2:-1]) <= {1}
    assert spec.accepted < 0.2 * spec.proposed <= spec.accepted + 0.2  # off once under 20%, not before


def test_acceptance_drops_a_draft_that_costs_more_than_it_saves():
    spec = Acceptance(k=3, max_k=5, window=8)
    spec.record_time(5.0, 1, plain_step_s=0.004)  # the first pass (the draft reads the prompt): not counted
    for _ in range(4):
        spec.record_time(0.010, 3, plain_step_s=0.004)  # 3.3 ms a token against 4 ms a plain step: pays
    assert spec.k == 3 and spec.emitted == 12
    slow = Acceptance(k=3, max_k=5, window=8)
    slow.record_time(0.0, 1, plain_step_s=0.004)
    slow.record_time(0.015, 3, plain_step_s=0.004)
    slow.record_time(0.015, 3, plain_step_s=0.004)
    assert slow.k == 3  # 6 tokens: under the window, not judged yet
    slow.record_time(0.015, 3, plain_step_s=0.004)
    assert slow.k == 0  # 5 ms a token against 4: off
    unknown = Acceptance(k=3, max_k=5, window=8)
    for _ in range(10):
        unknown.record_time(1.0, 1, plain_step_s=None)  # no yardstick (a sampled row): never judged by time
    assert unknown.k == 3


def test_step_clock_is_known_after_its_warm_steps():
    clock = StepClock(warm=2, weight=0.5)
    clock.add(0.010)
    assert not clock.known and clock.value is None
    clock.add(0.020)
    assert clock.known and clock.value == pytest.approx(0.015)


class _SlowDraft:
    """A draft that proposes what the target would (all accepted) but takes ``delay`` seconds a proposal."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, "slow"

    def propose(self, key, tokens, k, chooser):
        time.sleep(self.delay)
        return self.inner.propose(key, tokens, k, chooser)

    def forget(self, key) -> None:
        self.inner.forget(key)

    def close(self) -> None:
        self.inner.close()


def test_a_greedy_row_stops_speculating_when_the_draft_costs_more_than_it_saves():
    """A draft that sleeps 20 ms a proposal against a target that decodes in well under a millisecond: the row
    speculates from its third step (two plain steps time the target), and is back to plain steps once its passes
    have emitted a window of tokens; the output is the output without the draft. A sampled row keeps speculating
    (its draws depend on the path, so the clock does not choose it)."""
    config = GenerationConfig(temperature=0, max_new_tokens=80, ignore_eos=True)
    plain = Engine(VerifyingBackend(), HashTok(), max_rows=1)
    plain.add([10, 11, 12], config, seed=0)
    want = [e.result.token_ids for e in _run(plain) if hasattr(e, "result")]
    engine = Engine(VerifyingBackend(), HashTok(), max_rows=1, draft=_SlowDraft(_draft("same"), 0.02), draft_tokens=4)
    engine.add([10, 11, 12], config, seed=0)
    got = [e.result.token_ids for e in _run(engine) if hasattr(e, "result")]
    assert got == want
    stats = engine.speculation
    assert 32 <= stats.emitted < 32 + 2 * 8  # a window of tokens (and the pass that crossed it), then plain
    assert engine.plain_step.steps >= 80 - 2 - stats.emitted - 2
    sampled = Engine(VerifyingBackend(), HashTok(), max_rows=1, draft=_SlowDraft(_draft("same"), 0.002), draft_tokens=4)
    sampled.add([10, 11, 12], GenerationConfig(temperature=1.0, max_new_tokens=60, ignore_eos=True), seed=0)
    _run(sampled)
    assert sampled.speculation.emitted > 60 - 2 - 8


def _run(engine) -> list:
    events = []
    while engine.has_work():
        events += engine.step()
    return events


def _draft(kind: str):
    if kind == "ngram":
        return NgramDraft()
    return ModelDraft(VerifyingBackend(salt=0 if kind == "same" else 11))


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["ngram", "poor", "same"]),
    k=st.integers(1, 6),
    schedule=st.lists(
        st.tuples(st.integers(0, 6), st.lists(st.integers(8, V - 1), min_size=1, max_size=12)), min_size=1, max_size=3
    ),
    penalty=st.sampled_from([1.0, 1.3]),
    ngram=st.sampled_from([0, 2]),
    max_rows=st.integers(1, 3),
)
def test_greedy_output_with_any_draft_is_the_output_without(kind, k, schedule, penalty, ngram, max_rows):
    config = GenerationConfig(
        temperature=0, max_new_tokens=14, repetition_penalty=penalty, no_repeat_ngram_size=ngram, stop_token_ids=(9,)
    )
    plan = [(at, prompt, config, seed) for seed, (at, prompt) in enumerate(schedule)]
    tok = HashTok()
    plain = run_schedule(VerifyingBackend(), tok, plan, max_rows=max_rows, prefix_cache=None)
    drafted = run_schedule(
        VerifyingBackend(), tok, plan, max_rows=max_rows, prefix_cache=None, draft=_draft(kind), draft_tokens=k
    )
    assert drafted == plain


def test_a_run_speculates_and_a_row_can_opt_out():
    config = GenerationConfig(temperature=0, max_new_tokens=20, ignore_eos=True)
    engine = Engine(VerifyingBackend(), HashTok(), max_rows=1, draft=_draft("same"), draft_tokens=4)
    engine.add([10, 11, 12], config, seed=0)
    while engine.has_work():
        engine.step()
    stats = engine.speculation
    assert stats.passes and stats.accepted == stats.proposed  # the same model accepts everything
    assert stats.tokens_per_pass > 3
    engine.speculation.passes = 0
    engine.add([10, 11, 12], config, seed=0, speculate=False)
    while engine.has_work():
        engine.step()
    assert engine.speculation.passes == 0


def test_a_backend_that_cannot_verify_refuses_a_draft():
    from test_engine import HashBackend

    with pytest.raises(ConfigError, match="cannot verify"):
        Engine(HashBackend(), HashTok(), draft=NgramDraft())


def test_a_draft_with_another_vocabulary_is_refused():
    target, draft = VerifyingBackend(), VerifyingBackend()
    draft.spec = draft.spec.__class__(**{**draft.spec.__dict__, "vocab_size": V + 1})
    with pytest.raises(DraftMismatchError, match="vocabulary of 49 tokens, the target 48"):
        check_compatible(target, HashTok(), draft, HashTok(), where="student/")


# -- sampled rows: the distribution is the target's -------------------------------------------------------------
SAMPLED = GenerationConfig(temperature=1.0, top_k=3, repetition_penalty=1.5, max_new_tokens=3, ignore_eos=True)
PROMPT = [12, 30, 12]
DRAWS = 20_000


def _exact_joint(backend: VerifyingBackend, config: GenerationConfig, prompt: list[int]) -> dict[tuple, float]:
    """P(t1, t2, t3) of the target without a draft, enumerated with the rows' own chooser."""
    tok = HashTok()
    bans = static_bans(config, unk_id=tok.unk_id, tokenizer_vocab=tok.vocab_size, vocab=V)

    def dist(history: list[int]) -> np.ndarray:
        chooser = RowChooser(config, prompt, np.random.default_rng(0), vocab=V, banned=bans, eos=tok.eod_id)
        for token in history[len(prompt) :]:
            chooser.update(token)
        logits = backend._row_logits(history)
        return chooser.distribution(chooser.process(np.array(logits)))

    joint: dict[tuple, float] = {}
    p1 = dist(prompt)
    for t1 in np.flatnonzero(p1):
        p2 = dist([*prompt, t1])
        for t2 in np.flatnonzero(p2):
            p3 = dist([*prompt, t1, t2])
            for t3 in np.flatnonzero(p3):
                joint[(int(t1), int(t2), int(t3))] = p1[t1] * p2[t2] * p3[t3]
    return joint


def _draws(target, draft, seed: int) -> list[tuple[int, ...]]:
    engine = Engine(target, HashTok(), max_rows=1, prefix_cache=None, draft=draft, draft_tokens=2)
    out: list[tuple[int, ...]] = []
    rows = iter(range(DRAWS))
    while len(out) < DRAWS:
        for i in itertools.islice(rows, 200):  # a few at a time: one row runs, the rest wait their turn
            engine.add(PROMPT, SAMPLED, seed=seed, prompt_index=i)
        while engine.has_work():
            out += [tuple(e.result.token_ids) for e in engine.step() if hasattr(e, "result")]
    return out


def _chi_square(samples: list[tuple[int, ...]], expected: dict[tuple, float], length: int) -> float:
    from scipy.stats import chisquare

    probs: dict[tuple, float] = {}
    for key, p in expected.items():
        probs[key[:length]] = probs.get(key[:length], 0.0) + p
    keys = sorted(probs)
    counts = {key: 0 for key in keys}
    for sample in samples:
        counts[sample[:length]] += 1  # a sequence the target cannot produce: KeyError, a failure
    observed = np.array([counts[key] for key in keys], dtype=np.float64)
    return float(chisquare(observed, np.array([probs[key] for key in keys]) * len(samples)).pvalue)


def test_sampled_rows_with_a_poor_draft_keep_the_targets_distribution():
    """20,000 rows of 3 tokens (top-k 3, repetition penalty): tokens 2 and 3 come from speculative steps whose
    proposals (a draft that disagrees with the target everywhere) are mostly rejected. Chi-square of the first two
    and of all three tokens against the exact joint distribution; fixed seeds, so the p-values are fixed numbers.
    Power, shown on the likeliest bug: a rejection that draws from p instead of the residual max(0, p - q) (here
    the draft has the target's top-3 sets, reordered, so every sequence stays possible and only the mass moves)
    is rejected by the same test at p < 1e-6."""
    target, poor = VerifyingBackend(), VerifyingBackend(salt=11)
    expected = _exact_joint(target, SAMPLED, PROMPT)
    samples = _draws(target, ModelDraft(poor), seed=5)
    assert _chi_square(samples, expected, 2) > 0.001
    assert _chi_square(samples, expected, 3) > 0.001


def test_the_chi_square_test_sees_a_wrong_residual(monkeypatch):
    """The power claim above: the same draws with the residual replaced by p are told apart."""
    target = VerifyingBackend()
    expected = _exact_joint(target, SAMPLED, PROMPT)

    def biased(self, logits, proposed, q):
        if proposed is None:
            return self.pick(logits), False
        p = self.distribution(logits)
        if self.rng.random() * float(q[proposed]) < p[proposed]:
            return proposed, True
        return int(self.rng.choice(len(p), p=p)), False  # the bug: p, not max(0, p - q)

    monkeypatch.setattr(RowChooser, "verify", biased)
    samples = _draws(target, ModelDraft(ShuffledDraft()), seed=5)
    assert _chi_square(samples, expected, 3) < 1e-6


class ShuffledDraft(VerifyingBackend):
    """The target's logits with its values permuted among each row's top 3 (same support, other masses)."""

    def _row_logits(self, history):
        logits = super()._row_logits(history)
        top = np.argsort(logits)[-3:]
        logits[top] = logits[np.roll(top, 1)]
        return logits


# -- rollback: the target's cache is what a run without the draft would hold -----------------------------------
@pytest.fixture(scope="module")
def torch_pair(tiny_vocab):
    from conftest import make_tiny_model

    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    target = TorchBackend(make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id, seed=0))
    draft = TorchBackend(make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id, seed=1))
    return target, draft, tok


@pytest.mark.parametrize("config", [GenerationConfig(temperature=0), GenerationConfig(temperature=0.9, top_p=0.9)])
def test_rollback_leaves_the_cache_as_a_run_without_the_draft(torch_pair, config):
    import torch

    target, draft, tok = torch_pair
    config = config.replace(max_new_tokens=40, ignore_eos=True)
    prompt = tok.encode("滚滚长江东逝水")
    engine = Engine(target, tok, max_rows=1, prefix_cache=None, draft=ModelDraft(draft), draft_tokens=5)
    engine.add(prompt, config, seed=3)
    while engine.live_rows == 0 or len(engine._rows[0].ids) < 20:
        engine.step()
    row, batch = engine._rows[0], engine._batch
    history = prompt + row.ids[:-1]
    assert batch.width == len(history) and engine.speculation.passes
    ids = np.asarray([history])
    _, fresh = target.prefill(ids, np.ones_like(ids), np.arange(len(history))[None, :])
    for mine, theirs in zip(batch.state.layers, fresh.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)


def test_greedy_with_a_model_draft_on_torch_equals_without(torch_pair):
    from cpm_infer.engine.generate import generate

    target, draft, tok = torch_pair
    config = GenerationConfig(temperature=0, max_new_tokens=30, ignore_eos=True)
    prompts = [tok.encode("滚滚长江东逝水"), tok.encode("白发")]
    plain = [r.token_ids for r in generate(target, prompts, config, tok)]
    for d in (ModelDraft(draft), NgramDraft()):
        for one in prompts:
            got = generate(target, [one], config, tok, draft=d, draft_tokens=4)[0].token_ids
            assert got == plain[prompts.index(one)]


# -- onnxruntime: the verify pass on the exported graphs (plain, and GroupQueryAttention with the shared cache) -
@pytest.fixture(scope="module")
def ort_artifacts(tmp_path_factory, tiny_vocab):
    from test_export_onnx import save_random_checkpoint

    from export.onnx_export import export_onnx

    checkpoint = save_random_checkpoint(tiny_vocab, tmp_path_factory.mktemp("ckpt") / "tiny-random")
    root = tmp_path_factory.mktemp("ort")
    plain = export_onnx(checkpoint, root / "plain").path
    fused = export_onnx(checkpoint, root / "fused", optimize=True).path
    return checkpoint, plain, fused


@pytest.mark.parametrize("which", ["plain", "fused"])
def test_ort_verify_pass_equals_one_token_at_a_time(ort_artifacts, which):
    from cpm_infer.backends import load_backend

    _, plain, fused = ort_artifacts
    backend, tok = load_backend("ort", plain if which == "plain" else fused)
    prompt = tok.encode("滚滚长江东逝水")
    ids = np.asarray([prompt])
    new = [11, 12, 13, 14]
    _, state = backend.prefill(ids, np.ones_like(ids), np.arange(len(prompt))[None, :])
    total = len(prompt) + len(new)
    every, state = backend.extend_all(
        state, np.asarray([new]), np.ones((1, total), np.int64), np.arange(len(prompt), total)[None, :]
    )
    _, alone = backend.prefill(ids, np.ones_like(ids), np.arange(len(prompt))[None, :])
    for i, token in enumerate(new):
        at = len(prompt) + i
        step, alone = backend.decode(alone, np.asarray([[token]]), np.ones((1, at + 1), np.int64), np.asarray([[at]]))
        np.testing.assert_allclose(every[0, i], step[0], atol=1e-4)

    from cpm_infer.engine.generate import generate

    draft, _ = load_backend("ort", plain)
    share_cores(backend, draft)  # what open_draft does in a library's process: threads stop when a run ends
    for session in (backend.session, draft.session):
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    config = GenerationConfig(temperature=0, max_new_tokens=24, ignore_eos=True)
    plain_ids = generate(backend, [prompt], config, tok)[0].token_ids
    for d in (ModelDraft(draft), NgramDraft()):
        assert generate(backend, [prompt], config, tok, draft=d, draft_tokens=3)[0].token_ids == plain_ids


def test_shared_pool_is_sized_by_the_first_claim(monkeypatch):
    """onnxruntime's shared pool is used only where allowed, and made once per process: the first claim sizes
    it, a claim of another size is refused (those sessions keep their own pools), a pool made outside our claim is
    never claimed (but our sessions must run on it), and an onnxruntime without the API keeps per-session threads."""
    from types import SimpleNamespace

    from cpm_infer import ort_pool

    calls = []

    def set_sizes(intra, inter):
        calls.append((intra, inter))

    fake = SimpleNamespace(capi=SimpleNamespace(_pybind_state=SimpleNamespace(set_global_thread_pool_sizes=set_sizes)))
    monkeypatch.setattr(ort_pool, "require", lambda *a: fake)
    monkeypatch.setattr(ort_pool, "_pool", {})
    assert not ort_pool.claim_shared_pool(2)  # a library's process: never, unless allowed
    ort_pool.allow_shared_pool()
    assert ort_pool.claim_shared_pool(2) and ort_pool.claim_shared_pool(2)
    assert not ort_pool.claim_shared_pool(None) and not ort_pool.claim_shared_pool(4)
    assert calls == [(2, 1)]

    def refuse(intra, inter):
        raise RuntimeError("Global thread pools have already been created, cannot replace them")

    fake.capi._pybind_state.set_global_thread_pool_sizes = refuse
    monkeypatch.setattr(ort_pool, "_pool", {"allowed": 1})
    assert not ort_pool.claim_shared_pool(2) and not ort_pool.claim_shared_pool(2)
    assert ort_pool.shared_pool_size() == -1  # made elsewhere: our sessions must run on it too

    monkeypatch.setattr(ort_pool, "require", lambda *a: SimpleNamespace(capi=SimpleNamespace()))  # no such API
    monkeypatch.setattr(ort_pool, "_pool", {"allowed": 1})
    assert not ort_pool.claim_shared_pool(2) and ort_pool.shared_pool_size() is None  # per-session threads, as before


def test_cpm_generate_runs_model_and_draft_on_one_pool(ort_artifacts):
    """The ``cpm`` command's own process: the model and its draft move to one shared onnxruntime pool, and the
    greedy output is the one without the draft."""
    _, plain, fused = ort_artifacts
    base = [sys.executable, "-m", "cpm_infer.cli.app", "-v", "generate", "-m", str(fused), "-p", "滚滚长江东逝水"]
    base += ["-n", "16", "-t", "0", "--ignore-eos", "--threads", "2"]
    alone = subprocess.run(base, capture_output=True, text=True, check=True)
    drafted = subprocess.run([*base, "--draft", str(plain)], capture_output=True, text=True, check=True)
    assert drafted.stdout == alone.stdout and alone.stdout.strip()
    assert drafted.stderr.count("moved to the process's shared pool of 2 threads") == 2
    assert "shared pool" not in alone.stderr


def test_every_session_of_ours_runs_on_the_shared_pool_once_it_exists(monkeypatch):
    """onnxruntime refuses a session with threads of its own once the process's pool exists, so the options of
    every session we open (the model's, the row-gather and KV-ops helper graphs') follow the pool."""
    import onnxruntime as ort

    from cpm_infer import ort_pool

    monkeypatch.setattr(ort_pool, "_pool", {})
    alone = ort_pool.session_options(ort, 3)
    assert alone.use_per_session_threads and alone.intra_op_num_threads == 3 and alone.inter_op_num_threads == 1
    monkeypatch.setattr(ort_pool, "_pool", {"allowed": 1, "threads": 2})
    assert ort_pool.session_options(ort, 2).use_per_session_threads is False
    assert ort_pool.session_options(ort).use_per_session_threads is False  # the helper graphs ask for no count


def test_the_model_is_timed_once_per_draft_not_once_per_engine():
    """``generate`` makes an engine per call: the draft keeps the clock of each model's plain steps, so only the first
    call on a model spends decode steps timing it; the next one speculates from its first step. Another model the
    same draft serves is timed by its own steps."""
    from cpm_infer.engine.generate import generate
    from cpm_infer.engine.speculative import plain_step_clock

    draft, target = _draft("same"), VerifyingBackend()
    config = GenerationConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    first = generate(target, [[10, 11, 12]], config, HashTok(), draft=draft, draft_tokens=4)
    clock = plain_step_clock(draft, target)
    timed = clock.steps
    assert timed >= clock.warm
    again = generate(target, [[10, 11, 12]], config, HashTok(), draft=draft, draft_tokens=4)
    # no new timing: at most the last step is plain (no room left for a proposal)
    assert clock.steps - timed < clock.warm
    assert again[0].token_ids == first[0].token_ids
    other = VerifyingBackend()
    assert plain_step_clock(draft, other) is not clock and plain_step_clock(draft, other).steps == 0
