"""Optimization profiles derived from the KV contract (no TensorRT needed)."""

from __future__ import annotations

import pytest

from cpm_infer import kv
from cpm_infer.backends.trt.profiles import (
    DECODE,
    PREFILL,
    DimRange,
    EngineLimits,
    Profile,
    ProfileError,
    check_fits,
    make_profiles,
)
from cpm_infer.config import ModelSpec, preset

SPEC = ModelSpec(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=128)


def test_every_input_gets_min_opt_max_from_the_contract():
    prefill, decode = make_profiles(SPEC, EngineLimits(max_batch=4, max_input=16, max_total=64))
    shapes = prefill.shapes(SPEC)
    assert list(shapes) == kv.input_names(SPEC.n_layer)
    assert shapes[kv.INPUT_IDS] == ((1, 1), (1, 16), (4, 16))
    assert shapes[kv.ATTENTION_MASK] == ((1, 1), (1, 16), (4, 16))  # total = seq when past is 0
    assert shapes["past_key_values.1.value"] == ((1, 4, 0, 8), (1, 4, 0, 8), (4, 4, 0, 8))  # empty past
    d = decode.shapes(SPEC)
    assert d[kv.INPUT_IDS] == ((1, 1), (1, 1), (4, 1))
    assert d[kv.POSITION_IDS] == ((1, 1), (1, 1), (4, 1))
    assert d["past_key_values.0.key"] == ((1, 4, 1, 8), (1, 4, 32, 8), (4, 4, 63, 8))
    assert d[kv.ATTENTION_MASK] == ((1, 2), (1, 33), (4, 64))  # total = past + 1


def test_opt_shapes_are_clamped_into_range():
    prefill, decode = make_profiles(SPEC, EngineLimits(1, 4, 6), opt_batch=8, opt_input=128)
    assert prefill.dims[kv.BATCH] == DimRange(1, 1, 1)
    assert prefill.dims[kv.SEQ] == DimRange(1, 4, 4)
    assert decode.dims[kv.PAST] == DimRange(1, 3, 5)
    assert decode.dims[kv.TOTAL] == DimRange(2, 4, 6)


def test_cpm_small_profiles_fit_its_context():
    spec = preset("small")
    prefill, decode = make_profiles(spec, EngineLimits(8, 512, 1024))
    assert decode.shapes(spec)["past_key_values.11.key"][2] == (8, 12, 1023, 64)
    assert prefill.shapes(spec)[kv.INPUT_IDS][2] == (8, 512)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (EngineLimits(0, 16, 64), "--max-batch must be at least 1"),
        (EngineLimits(1, 0, 64), "--max-input must be at least 1"),
        (EngineLimits(1, 64, 64), "--max-total 64 must exceed --max-input 64"),
        (EngineLimits(1, 16, 129), "exceeds the model's context of 128"),
    ],
)
def test_bad_limits_are_one_line_errors(limits, message):
    with pytest.raises(ProfileError, match=message) as info:
        make_profiles(SPEC, limits)
    assert "\n" not in str(info.value)


def test_dim_range_rejects_disorder():
    with pytest.raises(ProfileError):
        DimRange(2, 1, 3)


def test_profiles_round_trip_through_json_dicts():
    profiles = make_profiles(SPEC, EngineLimits(2, 8, 32))
    again = [Profile.from_dict(p.to_dict()) for p in profiles]
    assert again == profiles
    assert EngineLimits.from_dict(EngineLimits(2, 8, 32).to_dict()) == EngineLimits(2, 8, 32)
    with pytest.raises(ProfileError):
        Profile.from_dict({"name": "x"})
    with pytest.raises(ProfileError):
        EngineLimits.from_dict({"max_batch": 1})


def test_check_fits_names_the_flag_to_raise():
    profiles = make_profiles(SPEC, EngineLimits(2, 8, 32))
    check_fits(profiles[PREFILL], batch=2, seq=8, past=0)
    check_fits(profiles[DECODE], batch=1, seq=1, past=31)
    with pytest.raises(
        ProfileError, match="a batch of 3 exceeds the engine's prefill limit of 2; rebuild .* --max-batch"
    ):
        check_fits(profiles[PREFILL], batch=3, seq=4, past=0)
    with pytest.raises(ProfileError, match="a prompt of 9 .* --max-input"):
        check_fits(profiles[PREFILL], batch=1, seq=9, past=0)
    with pytest.raises(ProfileError, match="a past of 32 .* --max-total"):
        check_fits(profiles[DECODE], batch=1, seq=1, past=32)
    with pytest.raises(ProfileError, match="past 0 is outside"):
        check_fits(profiles[DECODE], batch=1, seq=1, past=0)
