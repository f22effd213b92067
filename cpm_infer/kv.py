"""The KV-cache IO contract of exported graphs (ONNX, TensorRT), written down once.

Inputs
    input_ids                    (batch, seq)        int64   new tokens
    attention_mask               (batch, total)      int64   1 = real, 0 = left padding; total = past + seq
    position_ids                 (batch, seq)        int64   cumsum(mask) - 1, padded slots 0
    past_key_values.{i}.key      (batch, n_head, past, head_dim)   float   past = 0 on prefill
    past_key_values.{i}.value    (batch, n_head, past, head_dim)
Outputs
    logits                       (batch, seq, vocab) float32 (every position: perplexity needs them)
    present.{i}.key              (batch, n_head, total, head_dim)  float   = concat(past, new)
    present.{i}.value            (batch, n_head, total, head_dim)

One graph serves prefill (past length 0) and decode (seq 1). The TensorRT profiles and the ONNX
dynamic axes are both derived from ``DYNAMIC_AXES`` below.
"""

from __future__ import annotations

import numpy as np

from cpm_infer.config import ModelSpec

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# Score of a masked attention position before softmax. Finite (not finfo.min), so a float16 graph
# cannot overflow and a fully masked (padded) row softmaxes to uniform, not NaN; the exporter's graph
# and the fused attention kernels use the same value.
MASK_VALUE = -1e4

# Symbolic dimension names, shared by ONNX dynamic axes and TensorRT optimization profiles.
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def input_names(n_layer: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]


def dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    """Every dynamic dimension of every input and output, by name."""
    axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: BATCH, 1: SEQ},
        ATTENTION_MASK: {0: BATCH, 1: TOTAL},
        POSITION_IDS: {0: BATCH, 1: SEQ},
        LOGITS: {0: BATCH, 1: SEQ},
    }
    for name in past_names(n_layer):
        axes[name] = {0: BATCH, 2: PAST}
    for name in present_names(n_layer):
        axes[name] = {0: BATCH, 2: TOTAL}
    return axes


def kv_shape(spec: ModelSpec, batch: int, length: int) -> tuple[int, int, int, int]:
    """Shape of one key or value tensor: (batch, n_head, length, head_dim)."""
    return (batch, spec.n_head, length, spec.head_dim)


def pad_left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    """``array`` with zeros prepended along ``axis`` up to ``width`` (itself when already that wide)."""
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, dtype=array.dtype), array], axis=axis)
