"""The KV-cache IO contract of exported graphs (ONNX, TensorRT), written down once.

Inputs
    input_ids                    (batch, seq)        int64   new tokens
    attention_mask               (batch, total)      int64   1 = real, 0 = left padding; total = past + seq
    position_ids                 (batch, seq)        int64   cumsum(mask) - 1, padded slots 0
    past_key_values.{i}.key      (batch, n_head, past, head_dim)   float   past = 0 on prefill
    past_key_values.{i}.value    (batch, n_head, past, head_dim)
    logits_to_keep               (1,)                int64   ONNX graphs only: logits of the last n positions,
                                                             0 = every position
Outputs
    logits                       (batch, kept, vocab) float32: kept = seq, or the last n positions
    present.{i}.key              (batch, n_head, total, head_dim)  float   = concat(past, new)
    present.{i}.value            (batch, n_head, total, head_dim)

One graph serves prefill (past length 0) and decode (seq 1). The TensorRT profiles and the ONNX
dynamic axes are both derived from ``dynamic_axes`` below.

``logits_to_keep`` exists because generation reads one position's logits after a prefill of hundreds:
computing the LM head at every position costs a sixth of a CPM-small float32 prefill of 128 tokens, and
copying them out 15 MB. Scoring and speculative verification pass 0 (every position). ONNX graphs exported
before it have no such input (every position, always); TensorRT builds fix it at 0, so engines take
the KV contract's inputs only (``input_names``).
"""

from __future__ import annotations

import numpy as np

from cpm_infer.config import ModelSpec

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"

# Score of a masked attention position before softmax. Finite (not finfo.min), so a float16 graph
# cannot overflow and a fully masked (padded) row softmaxes to uniform, not NaN; the exporter's graph
# and the fused attention kernels use the same value.
MASK_VALUE = -1e4

# Symbolic dimension names, shared by ONNX dynamic axes and TensorRT optimization profiles.
BATCH, SEQ, PAST, TOTAL, KEPT = "batch", "seq", "past", "total", "kept"


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def input_names(n_layer: int) -> list[str]:
    """The KV contract's inputs (TensorRT engines, and ONNX graphs exported before ``logits_to_keep``)."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def graph_input_names(n_layer: int) -> list[str]:
    """The inputs of an exported ONNX graph: the KV contract's, then ``logits_to_keep``."""
    return [*input_names(n_layer), LOGITS_TO_KEEP]


def keeps_logits(names: list[str]) -> bool:
    """Whether a graph with these inputs takes ``logits_to_keep``."""
    return LOGITS_TO_KEEP in names


def keep_feed(last: bool) -> np.ndarray:
    """The ``logits_to_keep`` value: the last position only, or every position (0)."""
    return np.array([1 if last else 0], dtype=np.int64)


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]


def dynamic_axes(n_layer: int, *, keep: bool = False) -> dict[str, dict[int, str]]:
    """Every dynamic dimension of every input and output, by name (``keep``: of a graph with ``logits_to_keep``,
    whose logits have their own length)."""
    axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: BATCH, 1: SEQ},
        ATTENTION_MASK: {0: BATCH, 1: TOTAL},
        POSITION_IDS: {0: BATCH, 1: SEQ},
        LOGITS: {0: BATCH, 1: SEQ},
    }
    if keep:
        axes[LOGITS] = {0: BATCH, 1: KEPT}
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
