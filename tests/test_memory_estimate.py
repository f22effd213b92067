"""The GPU memory estimate (README table): parameter count equals transformers' GPT-2, terms add up."""

from __future__ import annotations

import pytest

from cpm_infer.config import PRESETS, ModelSpec
from cpm_infer.memory import gpu_memory, parameters, table


def test_parameter_count_is_gpt2s():
    pytest.importorskip("torch")
    from cpm_infer.torch_model import hf_config

    transformers = pytest.importorskip("transformers")
    spec = ModelSpec(n_layer=3, n_head=4, n_embd=64, vocab_size=300, n_positions=128)
    model = transformers.GPT2LMHeadModel(hf_config(spec))
    assert parameters(spec) == sum(p.numel() for p in model.parameters())  # the tied LM head counted once


def test_cpm_large_terms():
    large = PRESETS["large"]
    assert parameters(large) == 2_597_073_920  # 10.39 GB of float32
    m = gpu_memory(large, "fp16", batch=8, prompt=512, context=1024)
    assert m.weights == 2 * parameters(large)
    assert m.kv_cache == 2 * 2 * 32 * 8 * 1024 * 2560 * 2  # key + value, two buffers, every layer
    assert m.total == m.weights + m.kv_cache + m.activations
    assert gpu_memory(large, "fp32", batch=8, prompt=512, context=1024).weights == 2 * m.weights
    assert table(batch=1, prompt=16, context=64).count("| CPM-") == 2 * len(PRESETS)
