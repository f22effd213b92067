"""The backend contract: what the generation loop needs from a model runtime.

Arrays cross this boundary as numpy (int64 ids/positions/masks in, float32 logits out), so the loop
never imports a runtime. The KV cache stays inside the opaque ``state`` (on the device for GPU
backends). Inputs, for a batch of B rows:

- ``input_ids``       (B, T) int64: the new tokens (the whole left-padded prompt on prefill, one
  token per row on decode).
- ``attention_mask``  (B, P + T) int64: 1 for real tokens, 0 for left padding, over past + new.
- ``position_ids``    (B, T) int64: ``cumsum(mask) - 1`` with padded positions at 0.

Both calls return the logits of the last position only, shape (B, V) float32, and the new state.
The ONNX / TensorRT graphs follow the same contract with per-layer
``past_key_values.{i}.key|value`` inputs and ``present.{i}.key|value`` outputs of shape
(B, n_head, seq, head_dim), see ``cpm_infer.kv``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cpm_infer.config import ModelSpec

State = Any


@runtime_checkable
class Backend(Protocol):
    name: str
    spec: ModelSpec

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """Run the prompt (past length 0); return last-position logits (B, V) and the KV state."""
        ...

    def decode(
        self, state: State, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """Append one token per row to the state; return its logits (B, V) and the new state."""
        ...

    def select(self, state: State, rows: np.ndarray) -> State:
        """Keep only ``rows`` of the batch (finished sequences are dropped from later steps)."""
        ...
