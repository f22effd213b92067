"""Two operator choices of the CPU graph (``export.optimize``, ``export.kv_share``), timed alone on onnxruntime.

- The residual norm: com.microsoft ``SkipLayerNormalization`` (onnxruntime's fusion) against the ``Add`` and
  ``LayerNormalization`` it replaces.
- Attention's input: ``GroupQueryAttention`` reading Q | K | V packed in one tensor against a ``Split`` into three
  followed by the op reading them apart (prompt pass: the present KV is written from an empty past).

CPM-small widths (768, 12 heads), at 1 row (a decode step), 8 rows (a batch-8 step) and 128 rows (a prompt).

    python benchmarks/peers/norm_ops.py [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HIDDEN, HEADS = 768, 12
ROWS = (1, 8, 128)


def _session(nodes: list, inputs: dict, outputs: list[str], init: dict, threads: int, ints: dict | None = None):
    """A session of ``nodes``: float32 ``inputs`` and int32 ``ints`` (name -> shape), constant ``init``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
    values += [helper.make_tensor_value_info(n, TensorProto.INT32, s) for n, s in (ints or {}).items()]
    graph = helper.make_graph(
        nodes,
        "ops",
        values,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in init.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _us(session, feeds: dict, min_seconds: float = 0.3) -> float:
    session.run(None, feeds)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        session.run(None, feeds)
        count += 1
    return (time.perf_counter() - start) / count * 1e6


def norm_us(rows: int, threads: int) -> dict[str, float]:
    from onnx import helper

    x = np.random.default_rng(rows).standard_normal((1, rows, HIDDEN)).astype(np.float32)
    init = {"gamma": np.ones(HIDDEN, np.float32), "beta": np.zeros(HIDDEN, np.float32)}
    inputs = {"x": (1, rows, HIDDEN), "skip": (1, rows, HIDDEN)}
    fused = helper.make_node(
        "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain="com.microsoft", epsilon=1e-5
    )
    pair = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], epsilon=1e-5, axis=-1),
    ]
    feeds = {"x": x, "skip": x}
    return {
        "SkipLayerNormalization": _us(_session([fused], inputs, ["y"], init, threads), feeds),
        "Add + LayerNormalization": _us(_session(pair, inputs, ["y"], init, threads), feeds),
    }


def attention_us(rows: int, threads: int) -> dict[str, float]:
    from onnx import helper

    head = HIDDEN // HEADS
    qkv = np.random.default_rng(rows).standard_normal((1, rows, 3 * HIDDEN)).astype(np.float32)
    past = np.zeros((1, HEADS, rows, head), np.float32)
    feeds = {"qkv": qkv, "pk": past, "pv": past, "seqlens": np.array([rows - 1], np.int32)}
    feeds["total"] = np.array(rows, np.int32)
    inputs = {"qkv": (1, rows, 3 * HIDDEN), "pk": past.shape, "pv": past.shape}
    outputs = ["o", "present_k", "present_v"]
    ints = {"seqlens": [1], "total": []}

    def gqa(q: str, k: str, v: str):
        return helper.make_node(
            "GroupQueryAttention",
            [q, k, v, "pk", "pv", "seqlens", "total"],
            outputs,
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=HEADS,
            scale=head**-0.5,
        )

    split = helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=2)
    sizes = {"sizes": np.array([HIDDEN] * 3, np.int64)}
    out = {}
    for name, nodes, init in (("packed", [gqa("qkv", "", "")], {}), ("Split", [split, gqa("q", "k", "v")], sizes)):
        out[name] = _us(_session(nodes, inputs, outputs, init, threads, ints), feeds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"norm": {}, "attention_prompt": {}}
    for rows in ROWS:
        result["norm"][rows] = norm_us(rows, args.threads)
        result["attention_prompt"][rows] = attention_us(rows, args.threads)
        for what, times in ((k, result[k][rows]) for k in result):
            print(f"{rows:4d} rows  {what:16s} " + "  ".join(f"{name} {us:8.1f} us" for name, us in times.items()))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "us": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
