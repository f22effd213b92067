"""Bytes a decode step must read from memory, so a benchmark row can show achieved bandwidth.

Batch-1 decoding on a CPU is memory-bound: every step streams all matrix weights once (whatever the
batch) plus the KV cache of every row. ``achieved GB/s = step_bytes / step time``; next to the machine's
read bandwidth it says how far a row is from its floor. Counted per step:

- the matrices of every layer (QKV, attention output, MLP up/down: 12 d^2 weights) and the LM head
  (vocab x d), at the format's bytes per weight including its scales;
- biases and LayerNorm parameters (float32) and one row of each embedding table per token;
- the KV cache each row attends over: 2 (K, V) x layers x past x d elements per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpm_infer.config import ModelSpec

FLOAT_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}
KV_BYTES = {**FLOAT_BYTES, "int8": 1.0, "int4": 0.5}  # a quantized KV cache (its scales are per channel)


@dataclass(frozen=True)
class WeightFormat:
    """How a backend stores what a step reads: bytes per matrix weight (body and LM head) and per KV element."""

    name: str
    body_bytes: float
    head_bytes: float
    kv_bytes: float = 4.0

    def step_bytes(self, spec: ModelSpec, batch: int, past: float) -> float:
        d, layers = spec.n_embd, spec.n_layer
        matrices = layers * 12 * d * d * self.body_bytes + spec.vocab_size * d * self.head_bytes
        small = 4.0 * (layers * (4 * d + 9 * d) + 2 * d) + batch * 2 * d * 4.0  # biases, LNs, embedding rows
        kv = 2.0 * layers * batch * past * d * self.kv_bytes
        return matrices + small + kv


def float_format(dtype: str) -> WeightFormat:
    size = FLOAT_BYTES.get(dtype, 4.0)
    return WeightFormat(dtype, size, size, size)


def quantized_bytes(quantization: dict[str, Any], part: str, n_in: int) -> float:
    """Bytes per weight of a matrix with ``n_in`` input rows under ``details.quantization`` of a manifest."""
    scheme = quantization.get("scheme")
    if quantization.get(part, scheme) == "float32":
        return 4.0
    if part == "lm_head" and (quantization.get(part, scheme) != scheme or "lm_head_block_size" in quantization):
        return 1.0 + 4.0 / int(quantization.get("lm_head_block_size", 32))  # an 8-bit head in symmetric blocks
    bits = {"int8": 8, "int4": 4}.get(str(scheme))
    if bits is None:
        return 4.0
    block = quantization.get("block_size", 128 if bits == 4 else None)
    if block is None:  # int8 per channel: one int8 per weight + one float scale per output column
        return 1.0 + (4.0 / n_in if quantization.get("per_channel", True) else 0.0)
    # MatMulNBits: bits/8 bytes per weight + a float scale (and a zero point when asymmetric) per block
    return bits / 8 + (4.0 + (0.0 if quantization.get("symmetric", True) else bits / 8)) / int(block)


def artifact_format(details: dict[str, Any], dtype: str, spec: ModelSpec) -> WeightFormat:
    """The format of an exported artifact from its manifest's ``dtype`` and ``details``."""
    quantization = details.get("quantization") if isinstance(details, dict) else None
    kv = KV_BYTES.get(str(details.get("kv_dtype", dtype)) if isinstance(details, dict) else dtype, 4.0)
    if not isinstance(quantization, dict):
        size = FLOAT_BYTES.get(dtype, 4.0)
        return WeightFormat(dtype, size, size, kv)
    body = quantized_bytes(quantization, "body", spec.n_embd)
    head = quantized_bytes(quantization, "lm_head", spec.n_embd)
    return WeightFormat(str(quantization.get("scheme")), body, head, kv)
