"""Rows leaving (with cut padding) and joining a KV cache where it lives: the device path of
``OrtBackend.select`` / ``merge``, as two small ONNX graphs run with IO binding (no host round trip).

    select: y_i = Slice(Gather(x_i, rows, axis=0), start..end, axis=2)       x_i (B, nh, L, hs)
    merge:  y_i = Concat(Pad(a_i, left on axis 2), Pad(b_i, left on axis 2))  zeros in the padding

Each output is bound to the other buffer of its ping-pong pair, so the result is the contiguous cache
the next step reads (or to a new state's buffer: ``OrtBackend.copy_rows``, ``crop``). Like
``ort_gather.RowGather`` (the plain row gather), the graphs are built with ``onnx.helper`` once per backend
and run on the backend's provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cpm_infer.deps import require
from cpm_infer.ort_pool import session_options

IR_VERSION, OPSET = 8, 13  # Gather, Slice, Pad (pads as an input) and Concat as of opset 13


def _model(nodes: list, inputs: list, outputs: list, name: str) -> bytes:
    onnx = require("onnx", "ort-gpu")
    helper = onnx.helper
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def select_model_bytes(count: int, dtype: np.dtype | type) -> bytes:
    onnx = require("onnx", "ort-gpu")
    h, i64 = onnx.helper, onnx.TensorProto.INT64
    elem = h.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [h.make_tensor_value_info(f"x{i}", elem, ["batch", "heads", "past", "dim"]) for i in range(count)]
    inputs += [h.make_tensor_value_info(name, i64, shape) for name, shape in (("rows", ["kept"]), ("start", [1]))]
    inputs.append(h.make_tensor_value_info("end", i64, [1]))
    outputs = [h.make_tensor_value_info(f"y{i}", elem, ["kept", "heads", "length", "dim"]) for i in range(count)]
    nodes = [h.make_node("Constant", [], ["axis"], value=h.make_tensor("axis_v", i64, [1], [2]))]
    for i in range(count):
        nodes.append(h.make_node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0))
        nodes.append(h.make_node("Slice", [f"g{i}", "start", "end", "axis"], [f"y{i}"]))
    return _model(nodes, inputs, outputs, "select_kv_rows")


def merge_model_bytes(count: int, dtype: np.dtype | type) -> bytes:
    onnx = require("onnx", "ort-gpu")
    h, i64 = onnx.helper, onnx.TensorProto.INT64
    elem = h.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [h.make_tensor_value_info(f"a{i}", elem, ["ba", "heads", "la", "dim"]) for i in range(count)]
    inputs += [h.make_tensor_value_info(f"b{i}", elem, ["bb", "heads", "lb", "dim"]) for i in range(count)]
    inputs += [h.make_tensor_value_info("pads_a", i64, [8]), h.make_tensor_value_info("pads_b", i64, [8])]
    outputs = [h.make_tensor_value_info(f"y{i}", elem, ["batch", "heads", "width", "dim"]) for i in range(count)]
    nodes = []
    for i in range(count):
        nodes.append(h.make_node("Pad", [f"a{i}", "pads_a"], [f"pa{i}"]))
        nodes.append(h.make_node("Pad", [f"b{i}", "pads_b"], [f"pb{i}"]))
        nodes.append(h.make_node("Concat", [f"pa{i}", f"pb{i}"], [f"y{i}"], axis=0))
    return _model(nodes, inputs, outputs, "merge_kv_rows")


class KvOps:
    """select / merge over ``count`` KV buffers of shape (B, n_head, L, head_dim) at device addresses."""

    def __init__(
        self,
        ort: Any,
        count: int,
        dtype: np.dtype | type,
        *,
        heads: int,
        dim: int,
        device: tuple[str, int],
        providers: list[Any],
    ) -> None:
        self.count, self.dtype, self.heads, self.dim, self.device = count, np.dtype(dtype), heads, dim, device
        options = session_options(ort)
        self._select = ort.InferenceSession(select_model_bytes(count, self.dtype), options, providers=providers)
        self._merge = ort.InferenceSession(merge_model_bytes(count, self.dtype), options, providers=providers)

    def _shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.heads, length, self.dim)

    def select(
        self,
        sources: Sequence[int],
        targets: Sequence[int],
        *,
        batch: int,
        length: int,
        rows: np.ndarray,
        start: int,
        stop: int | None = None,
    ) -> None:
        """Rows ``rows`` (repeats allowed) of each (batch, nh, length, hs) source, positions ``start:stop``
        (``stop`` None: to the end), into the targets as (len(rows), nh, stop - start, hs)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        stop = length if stop is None else stop
        if rows.size == 0 or rows.min() < 0 or rows.max() >= batch or not 0 <= start < stop <= length:
            raise ValueError(f"rows {rows.tolist()} / positions {start}:{stop} outside a cache of {batch} x {length}")
        io = self._select.io_binding()
        kind, index = self.device
        for i, (src, dst) in enumerate(zip(sources, targets, strict=True)):
            io.bind_input(f"x{i}", kind, index, self.dtype, self._shape(batch, length), src)
            io.bind_output(f"y{i}", kind, index, self.dtype, self._shape(rows.size, stop - start), dst)
        io.bind_cpu_input("rows", rows)
        io.bind_cpu_input("start", np.array([start], dtype=np.int64))
        io.bind_cpu_input("end", np.array([stop], dtype=np.int64))
        self._select.run_with_iobinding(io)

    def merge(
        self,
        first: Sequence[int],
        second: Sequence[int],
        targets: Sequence[int],
        *,
        shapes: tuple[tuple[int, int], tuple[int, int]],
    ) -> None:
        """(batch, length) caches ``first`` and ``second`` -> their rows concatenated in the targets, each
        left-padded with zeros to the longer length."""
        (ba, la), (bb, lb) = shapes
        width = max(la, lb)
        io = self._merge.io_binding()
        kind, index = self.device
        for i, (a, b, dst) in enumerate(zip(first, second, targets, strict=True)):
            io.bind_input(f"a{i}", kind, index, self.dtype, self._shape(ba, la), a)
            io.bind_input(f"b{i}", kind, index, self.dtype, self._shape(bb, lb), b)
            io.bind_output(f"y{i}", kind, index, self.dtype, self._shape(ba + bb, width), dst)
        io.bind_cpu_input("pads_a", np.array([0, 0, width - la, 0, 0, 0, 0, 0], dtype=np.int64))
        io.bind_cpu_input("pads_b", np.array([0, 0, width - lb, 0, 0, 0, 0, 0], dtype=np.int64))
        self._merge.run_with_iobinding(io)
