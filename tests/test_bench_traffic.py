"""Bytes per decode step and the achieved-bandwidth column of ``cpm bench``."""

from __future__ import annotations

import numpy as np
import pytest

from cpm_infer.bench import harness
from cpm_infer.bench.runners import Timing
from cpm_infer.bench.traffic import WeightFormat, artifact_format, float_format
from cpm_infer.config import preset

SMALL = preset("small")
MATRICES = 12 * 12 * 768 * 768 + 30000 * 768  # CPM-small: 12 d^2 per layer + the LM head


def test_float32_step_reads_every_weight_and_the_kv_cache():
    fmt = float_format("float32")
    at_zero = fmt.step_bytes(SMALL, 1, 0)
    assert at_zero == pytest.approx(4 * MATRICES, rel=0.01)  # ~432 MB
    kv_900 = fmt.step_bytes(SMALL, 1, 900) - at_zero
    assert kv_900 == pytest.approx(2 * 12 * 900 * 768 * 4)  # 66 MB per token at past 900
    # The weights are read once per step whatever the batch; the KV cache once per row.
    assert fmt.step_bytes(SMALL, 8, 900) - fmt.step_bytes(SMALL, 8, 0) == pytest.approx(8 * kv_900)
    assert fmt.step_bytes(SMALL, 8, 0) - at_zero < 1e6


def test_quantized_artifact_formats_from_manifest_details():
    details = {"quantization": {"scheme": "int8", "lm_head": "int8", "per_channel": True}}
    int8 = artifact_format(details, "float32", SMALL)
    assert int8.body_bytes == pytest.approx(1 + 4 / 768) and int8.kv_bytes == 4
    int4 = artifact_format(
        {"quantization": {"scheme": "int4", "lm_head": "float32", "block_size": 32, "symmetric": True}},
        "float32",
        SMALL,
    )
    assert int4.body_bytes == pytest.approx(0.5 + 4 / 32) and int4.head_bytes == 4
    int8_blocks = artifact_format(
        {"quantization": {"scheme": "int8", "lm_head": "int8", "block_size": 32, "symmetric": True}}, "float32", SMALL
    )
    assert int8_blocks.body_bytes == int8_blocks.head_bytes == pytest.approx(1 + 4 / 32)
    head8 = artifact_format(
        {"quantization": {"scheme": "int4", "lm_head": "int8", "block_size": 32, "lm_head_block_size": 32}},
        "float32",
        SMALL,
    )
    assert (head8.body_bytes, head8.head_bytes) == (pytest.approx(0.5 + 4 / 32), pytest.approx(1 + 4 / 32))
    from export.quant_config import config_for

    kq8 = artifact_format({"quantization": config_for("int8").to_dict()}, "float32", SMALL)  # the int8 default
    assert (kq8.body_bytes, kq8.head_bytes) == (pytest.approx(1 + 5 / 64), pytest.approx(1 + 4 / 32))
    kv8 = artifact_format({"kv_dtype": "int8"}, "float32", SMALL)
    assert (kv8.body_bytes, kv8.kv_bytes) == (4, 1)
    assert artifact_format({}, "float16", SMALL) == WeightFormat("float16", 2, 2, 2)


def test_measure_reports_achieved_bandwidth():
    class Runner:
        name = "x"

        def traffic(self, batch, past):
            self.asked = (batch, past)
            return 2e9  # 2 GB per step

        def run(self, prompts, new_tokens):
            return Timing(0.01, [0.004] * (new_tokens - 1), new_tokens)

    runner = Runner()
    case = harness.Case(batch=1, prompt_len=16, new_tokens=9, sweep="base")
    m = harness.measure(runner, case, np.zeros((1, 16), dtype=np.int64), repeats=1, warmup=0)
    assert runner.asked == (1, 16 + 9 / 2)
    assert m.gb_per_s == pytest.approx(2e9 / 0.004 / 1e9)
    assert m.to_dict()["gb_per_s"] == m.gb_per_s
