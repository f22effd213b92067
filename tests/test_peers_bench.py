"""The peer script's bookkeeping (benchmarks/peers/peers_bench.py): which number each case times, and each
target's ratio, direction and limit, on made-up timings (no engine runs here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


@pytest.fixture(scope="module")
def pb():
    sys.path.insert(0, str(PEERS))  # the script imports its sibling modules as top-level ones
    try:
        import peers_bench

        yield peers_bench
    finally:
        sys.path.remove(str(PEERS))


def _speed(pb, rounds: dict) -> dict:
    """rounds: engine -> case -> per-round seconds."""
    return pb.summarize_speed(rounds)


def _rounds(b1, ctx, b8, pf):
    return {"b1": b1, "ctx900": ctx, "b8": b8, "pf128": pf}


def test_targets_pair_rounds_and_point_each_limit_the_right_way(pb):
    times = {
        "ours-fp32": _rounds([0.016, 0.018], [0.02, 0.02], [0.03, 0.03], [0.100, 0.110]),
        "llama-f32": _rounds([0.020, 0.020], [0.03, 0.03], [0.04, 0.04], [0.140, 0.140]),
        "ours-int8": _rounds([0.006, 0.007], [0.01, 0.01], [0.016, 0.016], [0.050, 0.050]),
        "llama-q8_0": _rounds([0.008, 0.008], [0.02, 0.02], [0.024, 0.024], [0.040, 0.040]),
        "ours-int4": _rounds([0.004, 0.004], [0.01, 0.01], [0.012, 0.012], [0.030, 0.030]),
        "llama-q4_K_M": _rounds([0.0045, 0.0045], [0.02, 0.02], [0.02, 0.02], [0.100, 0.100]),
    }
    rows = {t["target"]: t for t in pb.targets(_speed(pb, times), None)}
    int4 = rows["ours-int4 decode / llama-q4_K_M"]
    assert int4["value"] == pytest.approx(0.889, abs=1e-3) and int4["limit"] == 0.85 and not int4["met"]
    fp32 = rows["ours-fp32 decode / llama-f32"]
    assert fp32["value"] == pytest.approx(0.85) and fp32["met"]  # median of 0.8 and 0.9, limit 0.9
    b8 = rows["ours-int8 batch-8 tokens/s / llama-q8_0"]  # our tokens/s over theirs: higher is better
    assert b8["value"] == pytest.approx(1.5) and b8["met"]
    assert rows["ours-int8 prefill 128 / llama-q8_0"]["value"] == pytest.approx(1.25)
    assert not rows["ours-int8 prefill 128 / llama-q8_0"]["met"]
    assert rows["ours-int4 prefill 128 / llama-q4_K_M"]["met"]
    assert "ours-int4 decode / llama-q4_0" not in rows  # an engine left out (--engines): no row, no error


def test_each_case_times_what_it_says(pb):
    class Native(pb.NativeRunner):
        def __init__(self) -> None:
            self.calls = []

        def step_seconds(self, batch, prompt, steps):
            self.calls.append(("step", batch, prompt, steps))
            return 0.5

        def prefill_seconds(self, prompt):
            self.calls.append(("prefill", prompt))
            return 0.25

    class Ours:
        def __init__(self) -> None:
            self.calls = []

        def run(self, prompts, new_tokens):
            from cpm_infer.bench.runners import Timing

            self.calls.append((prompts.shape, new_tokens))
            return Timing(first_token_s=0.125, step_s=[0.01, 0.03])

    native, ours = Native(), Ours()
    prefill, decode = np.zeros((1, 128), np.int64), np.zeros((8, 16), np.int64)
    assert pb._case_seconds(native, "pf128", prefill) == 0.25 and native.calls[-1] == ("prefill", 128)
    assert pb._case_seconds(native, "b8", decode) == 0.5 and native.calls[-1] == ("step", 8, 16, pb.NEW - 1)
    assert pb._case_seconds(ours, "pf128", prefill) == 0.125 and ours.calls[-1] == ((1, 128), 1)
    assert pb._case_seconds(ours, "b8", decode) == pytest.approx(0.02) and ours.calls[-1] == ((8, 16), pb.NEW)


def test_each_timed_call_of_ours_follows_an_untimed_one_of_the_same_shape(pb):
    """llama-bench warms up before each test (its default); ours gets a warm-up call of the same case, on another
    prompt (a repeated one would come from the prefix cache), right before each timed call, in every round."""
    from cpm_infer.bench.runners import Timing

    class Ours:
        def __init__(self) -> None:
            self.calls = []

        def run(self, prompts, new_tokens):
            self.calls.append((prompts.copy(), new_tokens))
            return Timing(first_token_s=0.125, step_s=[0.01, 0.03])

    ours = Ours()
    times = pb.time_speed({"ours-int4": ours}, 2, 100, cases=("b1", "pf128"))
    assert times == {"ours-int4": {"b1": [0.02, 0.02], "pf128": [0.125, 0.125]}}
    timed = ours.calls[2:]  # after the start-up warm-up of each case
    assert len(timed) == 8  # 2 rounds x 2 cases x (warm-up, timed)
    for (warm, warm_new), (prompt, new) in zip(timed[::2], timed[1::2], strict=True):
        assert warm.shape == prompt.shape and not np.array_equal(warm, prompt) and warm_new == 2 and new >= 1


def test_a_run_without_some_cases_leaves_their_columns_and_targets_out(pb):
    times = {
        "ours-int4": {"b1": [0.04, 0.05], "pf128": [0.9, 1.0]},
        "llama-q4_K_M": {"b1": [0.05, 0.05], "pf128": [1.0, 1.0]},
    }
    speed = pb.summarize_speed(times)
    assert speed["ours-int4"]["b8_tokens_per_s"] is None and speed["ours-int4"]["decode_ms_past900"] is None
    rows = {t["target"] for t in pb.targets(speed, None)}
    assert rows == {"ours-int4 decode / llama-q4_K_M", "ours-int4 prefill 128 / llama-q4_K_M"}
    env = {"cpu": "x", "cores": 2, "threads": 2, "read_gb_per_s": 1.0, "loadavg_before": [0], "loadavg_after": [0]}
    report = {"command": "c", "environment": env | {"versions": {}, "rounds": 2}, "speed": speed, "targets": []}
    table = pb.markdown(report)
    assert "| ours-int4 | 45.00 | - | - | - | - | 950.0 |" in table
