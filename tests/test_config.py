import dataclasses

import pytest

from cpm_infer.config import PRESETS, ConfigError, GenerationConfig, ModelSpec, preset


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("min_new_tokens", -1),
        ("min_new_tokens", 500),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("banned_ids", (-3,)),
        ("stop_strings", ("",)),
        ("seed", -1),
        ("num_samples", 0),
        ("max_new_tokens", True),
    ],
)
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**{field: value})


def test_frozen_and_replace():
    config = GenerationConfig(stop_strings=["。"], banned_ids=[3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 0.5  # type: ignore[misc]
    assert config.stop_strings == ("。",) and config.banned_ids == (3,)
    greedy = config.replace(temperature=0)
    assert greedy.greedy and not config.greedy
    with pytest.raises(ConfigError):
        config.replace(top_p=2)


def test_dict_round_trip_and_unknown_keys():
    config = GenerationConfig(max_new_tokens=7, stop_strings=("a",), seed=None)
    assert GenerationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown generation setting"):
        GenerationConfig.from_dict({"top_q": 1})


def test_presets_match_cpm_sizes():
    assert [(s.n_layer, s.n_embd, s.n_head) for s in PRESETS.values()] == [
        (12, 768, 12),
        (24, 1024, 16),
        (32, 2560, 32),
    ]
    assert all(s.vocab_size == 30000 and s.n_positions == 1024 for s in PRESETS.values())
    # CPM-small is ~109M parameters with a tied head (436 MB fp32)
    assert 108e6 < PRESETS["small"].parameter_count() < 110e6
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_spec_validation():
    with pytest.raises(ConfigError, match="divisible"):
        ModelSpec(n_layer=1, n_head=3, n_embd=32)
    with pytest.raises(ConfigError, match="positive"):
        ModelSpec(n_layer=0, n_head=1, n_embd=8)
