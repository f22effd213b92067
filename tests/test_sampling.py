"""Sampling primitives: top-k / top-p against a full-sort reference (hypothesis), the draw, penalties
against transformers' processors and OpenAI's formula."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cpm_infer.config import GenerationConfig
from cpm_infer.engine import sampling
from cpm_infer.engine.chooser import RowChooser
from cpm_infer.engine.processors import NgramBans

NEG = -np.inf


def reference_keep(logits: np.ndarray, k: int, p: float) -> tuple[set[int], dict[int, float], int]:
    """Top-k then top-p by full sort: the kept ids, each id's mass-before in the top-p order, and the most
    likely id (the first in that order: highest probability, lowest id among equal probabilities)."""
    ids = np.arange(len(logits))
    if 0 < k < len(logits):
        kth = np.sort(logits)[::-1][k - 1]
        ids = np.flatnonzero(logits >= kth)
    probs = sampling.softmax(logits[ids])
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order], dtype=np.float64)
    before = np.concatenate([[0.0], cum[:-1]])
    kept = {int(ids[i]) for i, b in zip(order, before, strict=True) if p >= 1.0 or b < p}
    return kept, {int(ids[i]): float(b) for i, b in zip(order, before, strict=True)}, int(ids[order[0]])


def kept_ids(logits: np.ndarray, k: int, p: float) -> set[int]:
    """The set computed outright (``candidates``: the selection on mass, the rejection sampler's fallback)."""
    ids, weights = sampling.candidates(logits.copy(), k, p)  # candidates works in place
    chosen = np.flatnonzero(weights > 0)
    return {int(i) for i in (chosen if ids is None else ids[chosen])}


def accepted_ids(logits: np.ndarray, k: int, p: float) -> set[int]:
    """The tokens the rejection sampler accepts: those whose mass ahead is < p."""
    ids, probs = sampling._top_k(logits.copy(), k)
    inside = [i for i in range(probs.size) if probs[i] > 0 and (p >= 1.0 or sampling.mass_before(probs, i) < p)]
    return {int(ids[i]) if ids is not None else i for i in inside}


def positive(logits: np.ndarray, ids: set[int], k: int) -> set[int]:
    """The ids of ``ids`` with a non-zero probability (a zero can never be drawn)."""
    pool = np.arange(len(logits))
    if 0 < k < len(logits):
        pool = np.flatnonzero(logits >= np.sort(logits)[::-1][k - 1])
    probs = dict(zip(pool.tolist(), sampling.softmax(logits[pool]).tolist(), strict=True))
    return {i for i in ids if probs.get(i, 0.0) > 0}


# Rows with ties, flat rows, banned (-inf) entries and wide ranges.
values = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.5, 2.5, -7.0]),
    st.floats(-40, 40, width=32),
    st.floats(-(2**-20), 2**-20, width=32),  # distinct logits, often one float32 probability
    st.just(NEG),
)
rows = st.integers(1, 300).flatmap(
    lambda n: st.one_of(
        hnp.arrays(np.float32, n, elements=values),
        hnp.arrays(np.float32, n, elements=st.sampled_from([0.0, 0.5])),  # few distinct values: ties
        st.just(np.zeros(n, np.float32)),  # flat
        st.floats(-5, 5, width=32).map(lambda x, n=n: np.full(n, x, np.float32)),
    )
)


@settings(max_examples=400, deadline=None)
@given(logits=rows, k=st.integers(0, 310), p=st.one_of(st.sampled_from([1.0, 0.9, 0.5, 0.3, 1e-9]), st.floats(0.01, 1)))
def test_top_k_top_p_keep_the_full_sort_reference_set(logits, k, p):
    if not np.isfinite(logits).any():
        logits[0] = 0.0  # a row with no allowed token is the chooser's case, not the filter's
    ref, before, first = reference_keep(logits, k, p)
    for ours in (kept_ids(logits, k, p), accepted_ids(logits, k, p)):
        # Distinct logits can round to one float32 probability: "most likely" is by probability, then id.
        assert first in ours, "the most likely token is always kept"
        # Identical, except where a token's mass-before equals p to within float rounding of the sums.
        diff = ours ^ positive(logits, ref, k)
        assert all(abs(before[i] - p) < 1e-9 for i in diff), (sorted(diff), p)


@settings(max_examples=200, deadline=None)
@given(
    logits=hnp.arrays(np.float32, st.integers(2, 400), elements=st.floats(-20, 20, width=32)),
    p=st.floats(0.05, 0.99),
)
def test_nucleus_is_minimal(logits, p):
    """The kept mass reaches p, and dropping the least likely kept token would fall short of it."""
    probs = sampling.softmax(logits)
    keep = sampling.nucleus_mask(probs, p)
    mass = probs[keep].astype(np.float64).sum()
    smallest = probs[keep].min()
    assert mass >= p - 1e-6 or keep.all()
    assert mass - smallest < p + 1e-6


def test_flat_row_keeps_the_lowest_ids_and_the_cost_is_one_pass():
    logits = np.zeros(30000, np.float32)
    keep = sampling.nucleus_mask(sampling.softmax(logits), 0.3)
    assert keep.sum() == 9000 and keep[:9000].all()  # 0.3 * 30000, lowest ids first (stable order)
    probs = np.array([0.5, 0.25, 0.25], np.float32)
    assert sampling.nucleus_mask(probs, 0.5).tolist() == [True, False, False]
    assert sampling.nucleus_mask(probs, 0.75).tolist() == [True, True, False]  # the tie goes to id 1
    assert sampling.nucleus_mask(probs, 0.76).tolist() == [True, True, True]


def test_top_k_keeps_ties_with_the_kth():
    logits = np.array([1.0, 5.0, 3.0, 4.0, 4.0], np.float32)
    assert kept_ids(logits, 2, 1.0) == {1, 3, 4}
    assert kept_ids(logits, 1, 1.0) == {1}
    assert kept_ids(logits, 0, 1.0) == {0, 1, 2, 3, 4}


def test_draw_follows_the_kept_distribution():
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05], np.float32))
    rng = np.random.default_rng(0)
    draws = Counter(sampling.sample_row(logits.copy(), 0, 0.8, rng) for _ in range(6000))
    assert set(draws) == {0, 1}  # 0.6 < 0.8 <= 0.85
    assert draws[0] / 6000 == pytest.approx(0.6 / 0.85, abs=0.02)
    draws = Counter(sampling.sample_row(logits.copy(), 3, 1.0, rng) for _ in range(6000))
    assert set(draws) == {0, 1, 2} and draws[2] / 6000 == pytest.approx(0.1 / 0.95, abs=0.015)


def test_rejection_and_its_fallback_sample_the_same_distribution():
    """A small p on a flat-ish row misses often: the fallback (the nucleus computed outright) takes over
    after three draws; the mixture is still the renormalised nucleus."""
    rng = np.random.default_rng(1)
    probs = sampling.softmax(np.linspace(0.0, 0.5, 40, dtype=np.float32))
    kept = sampling.kept_weights(probs, 0.2)
    want = kept / kept.sum()
    counts = np.bincount([sampling.sample_nucleus(probs, 0.2, rng) for _ in range(8000)], minlength=40) / 8000
    np.testing.assert_allclose(counts, want, atol=0.02)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(want))


def test_draw_never_picks_a_zero_weight():
    weights = np.array([0.0, 0.3, 0.0, 0.7, 0.0], np.float32)
    assert {sampling.draw(weights, u) for u in np.linspace(0, 0.999999, 200)} == {1, 3}


def test_softmax_and_log_softmax():
    x = np.array([[0.0, np.log(3.0)], [NEG, 0.0]], np.float32)
    np.testing.assert_allclose(sampling.softmax(x), [[0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(np.exp(sampling.log_softmax(x)), [[0.25, 0.75], [0.0, 1.0]], atol=1e-7)


# -- penalties ----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.integers(0, 29), min_size=1, max_size=40),
    penalty=st.floats(0.2, 3.0),
    seed=st.integers(0, 100),
)
def test_repetition_penalty_equals_transformers(history, penalty, seed):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = np.random.default_rng(seed).normal(size=30).astype(np.float32) * 3
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), torch.tensor(scores[None]))
    got = scores.copy()
    sampling.apply_repetition_penalty(got, np.unique(history), penalty)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(history=st.lists(st.integers(0, 9), min_size=1, max_size=30), n=st.integers(1, 4))
def test_no_repeat_ngram_equals_transformers_at_every_length(history, n):
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    bans = NgramBans(n, history[:1])
    for length in range(1, len(history) + 1):
        if length > 1:
            bans.add(history[length - 1])
        scores = torch.zeros(1, 10)
        ref = NoRepeatNGramLogitsProcessor(n)(torch.tensor([history[:length]]), scores)
        assert bans.banned() == torch.nonzero(torch.isinf(ref[0])).flatten().tolist()


def test_presence_and_frequency_follow_openai():
    generated = [3, 5, 3, 3, 8]
    logits = np.linspace(-1, 1, 10).astype(np.float32)
    counts = Counter(generated)
    want = logits.copy()
    for token, count in counts.items():  # logit -= presence * (count > 0) + frequency * count
        want[token] -= 0.4 * 1 + 0.25 * count
    ids = np.array(sorted(counts))
    got = logits.copy()
    sampling.apply_presence_frequency(got, ids, np.array([counts[i] for i in ids], np.float32), 0.4, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-45, 5e-324])
def test_a_tiny_temperature_is_the_greedy_limit_without_nan(temperature):
    """Dividing raw logits by a temperature near 0 overflows to inf (inf - inf = NaN in the softmax); the chooser
    shifts the row first, so the limit is the argmax, with no floating-point warning."""
    logits = (np.random.default_rng(1).normal(size=200) * 3).astype(np.float32)
    logits[5] = -np.inf  # a banned token stays banned
    config = GenerationConfig(temperature=temperature)
    row = RowChooser(config, [1], np.random.default_rng(0), vocab=200, banned=np.array([0]), eos=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert row.pick(row.process(logits.copy())) == int(np.argmax(logits))
    banned_all = np.full(200, -np.inf, np.float32)
    assert row.pick(banned_all) == 7  # nothing allowed: the row ends


def test_a_tiny_repetition_penalty_stays_finite():
    """Dividing a positive logit by a penalty near 0 overflows float32; the result is clipped, so the seen token
    becomes the (finite) favourite instead of a NaN row."""
    logits = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampling.apply_repetition_penalty(logits, np.array([0, 2]), 1e-40)
    assert np.isfinite(logits).all() and int(np.argmax(logits)) == 0
    config = GenerationConfig(repetition_penalty=1e-40, temperature=0.7)
    row = RowChooser(config, [0, 1], np.random.default_rng(0), vocab=4, banned=np.array([], np.int64), eos=3)
    assert row.pick(row.process(np.array([1.0, 2.0, -1.0, 0.5], np.float32))) in (0, 1)
