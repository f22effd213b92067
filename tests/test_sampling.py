import numpy as np
import pytest

from cpm_infer import sampling
from cpm_infer.config import GenerationConfig

NEG = -np.inf


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([[2.0, -1.0, 3.0, 0.5]])
    seen = np.array([[True, True, False, False]])
    out = sampling.apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, 0.5]])


def test_ban_ids():
    out = sampling.ban_ids(np.array([[1.0, 2.0, 3.0]]), [0, 2])
    assert out.tolist() == [[NEG, 2.0, NEG]]


def test_temperature():
    np.testing.assert_allclose(sampling.apply_temperature(np.array([[1.0, -2.0]]), 0.5), [[2.0, -4.0]])


def test_top_k_keeps_k_largest_and_ties():
    logits = np.array([[1.0, 5.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0]])
    out = sampling.top_k_filter(logits, 2)
    assert out.tolist() == [[NEG, 5.0, NEG, 4.0], [2.0, 2.0, NEG, NEG]]
    assert sampling.top_k_filter(logits, 0) is logits


def test_top_p_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(sampling.top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert np.isfinite(sampling.top_p_filter(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert np.isfinite(sampling.top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    # the top token is always kept, even for a tiny p
    assert np.isfinite(sampling.top_p_filter(logits, 1e-9)).tolist() == [[True, False, False, False]]
    # order of the vocabulary does not matter
    shuffled = logits[:, [3, 1, 0, 2]]
    assert np.isfinite(sampling.top_p_filter(shuffled, 0.79)).tolist() == [[False, True, True, False]]


def test_softmax_rows_sum_to_one():
    probs = sampling.softmax(np.array([[0.0, np.log(3.0)], [NEG, 0.0]]))
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.0, 1.0]])


def test_sample_respects_filtered_tokens_and_seed():
    logits = np.array([[NEG, 0.0, NEG, 0.0]] * 2)
    draws = [sampling.sample(logits, [np.random.default_rng(s), np.random.default_rng(s + 100)]) for s in range(50)]
    assert {int(t) for d in draws for t in d} == {1, 3}
    again = sampling.sample(logits, [np.random.default_rng(7), np.random.default_rng(107)])
    assert again.tolist() == sampling.sample(logits, [np.random.default_rng(7), np.random.default_rng(107)]).tolist()


def test_sample_frequencies_follow_probabilities():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rng = np.random.default_rng(0)
    counts = np.bincount([int(sampling.sample(logits, [rng])[0]) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_greedy():
    assert sampling.greedy(np.array([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]])).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (GenerationConfig(temperature=0), 0),
        (GenerationConfig(temperature=1.0, top_k=0, top_p=1.0), 0),
        (GenerationConfig(temperature=0.7, top_k=5, top_p=0.9), 3),
        (GenerationConfig(temperature=0, top_k=5, top_p=0.9), 0),
    ],
)
def test_pipeline_builds_only_steps_that_change_something(config, count):
    assert len(sampling.build_pipeline(config, [])) == count
    assert len(sampling.build_pipeline(config, [0])) == count + 1


def test_top_p_candidate_path_equals_full_sort():
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=(6, 3000)) * 4.0  # top 256 hold the mass: the fast path
    flat = rng.normal(size=(3, 3000)) * 0.1  # they do not: the full-sort fallback
    for logits in (peaked, flat, np.concatenate([peaked, flat])):
        fast = sampling.top_p_filter(logits, 0.9)
        full = sampling.top_p_filter(logits, 0.9, candidates=logits.shape[-1])
        assert np.array_equal(np.isfinite(fast), np.isfinite(full))
        kept_mass = (sampling.softmax(logits) * np.isfinite(fast)).sum(axis=-1)
        assert np.all(kept_mass >= 0.9)
