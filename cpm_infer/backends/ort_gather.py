"""Gather KV rows where they live (the CUDA path of ``OrtBackend.select``), without a host round trip.

ONNX Runtime's Python API copies whole OrtValues only, and a kept row is a slice of a flat buffer, so
the copy runs as a graph: one ``Gather(axis=0)`` per KV tensor, all sharing one ``rows`` input, on the
backend's provider with IO binding. Each input is a current buffer viewed as (batch, row elements),
each output the other buffer of its pair viewed as (kept, row elements), so the result is the
contiguous (kept, n_head, past, head_dim) cache the next step reads. One ``run`` per ``select``; the
row indices (a few int64) are the only bytes that cross from the host. ORT synchronises the provider's
stream at the end of ``run``, so the model's next step sees the gathered rows.

The graph is built with ``onnx.helper`` (the ``ort-gpu`` extra installs onnx) once per backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cpm_infer.deps import require
from cpm_infer.ort_pool import session_options

IR_VERSION, OPSET = 8, 13  # old enough for every onnxruntime >= 1.20, Gather unchanged since 13
ROWS = "rows"


def gather_model_bytes(count: int, dtype: np.dtype | type) -> bytes:
    """The serialized graph: ``y{i} = Gather(x{i}, rows, axis=0)`` for i < count, x/y of ``dtype``."""
    onnx = require("onnx", "ort-gpu")
    helper = onnx.helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(f"x{i}", elem, ["batch", "row"]) for i in range(count)]
    inputs.append(helper.make_tensor_value_info(ROWS, onnx.TensorProto.INT64, ["kept"]))
    outputs = [helper.make_tensor_value_info(f"y{i}", elem, ["kept", "row"]) for i in range(count)]
    nodes = [helper.make_node("Gather", [f"x{i}", ROWS], [f"y{i}"], axis=0) for i in range(count)]
    graph = helper.make_graph(nodes, "gather_kv_rows", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class RowGather:
    """Gathers rows of ``count`` same-shaped device buffers into ``count`` others in one ORT run."""

    def __init__(
        self, ort: Any, count: int, dtype: np.dtype | type, *, device: tuple[str, int], providers: list[Any]
    ) -> None:
        self.count, self.dtype, self.device = count, np.dtype(dtype), device
        options = session_options(ort)
        self.session = ort.InferenceSession(gather_model_bytes(count, self.dtype), options, providers=providers)
        self._binding = self.session.io_binding()

    def __call__(
        self, sources: Sequence[int], targets: Sequence[int], *, batch: int, row: int, rows: np.ndarray
    ) -> None:
        """Rows ``rows`` of each (batch, row) buffer at ``sources[i]`` -> (len(rows), row) at ``targets[i]``."""
        if len(sources) != self.count or len(targets) != self.count:
            raise ValueError(f"expected {self.count} source and target buffers, got {len(sources)} / {len(targets)}")
        rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= batch):
            raise ValueError(f"rows {rows.tolist()} outside a batch of {batch}")
        if rows.size == 0 or row == 0:
            return
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        kind, index = self.device
        for i, (src, dst) in enumerate(zip(sources, targets, strict=True)):
            io.bind_input(f"x{i}", kind, index, self.dtype, (batch, row), src)
            io.bind_output(f"y{i}", kind, index, self.dtype, (rows.size, row), dst)
        io.bind_cpu_input(ROWS, rows)
        self.session.run_with_iobinding(io)
