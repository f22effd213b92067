"""How fast can a batch go? Measured matrix-multiply throughput of the kernels our artifacts use.

A decode step of batch B multiplies B rows by every weight matrix: 2 x (12 d^2 x layers + vocab x d)
FLOPs per row (CPM-small: 216 MFLOP per token). Batch 1 is bound by reading the weights; a large batch
by arithmetic. So tokens/s at batch 8 over batch 1 cannot exceed 8 x t(1) / max(t(1), 8 x FLOPs / peak),
where peak is the best throughput the format's kernel reaches on this CPU. This module measures that
peak on one MLP-shaped matrix (768 x 3072, weights cache-resident, i.e. the kernel's best case) for
rows = 1, 8, 64, 256, for each format: float32 ``MatMul`` (MLAS SGEMM), int8 ``MatMulNBits`` (8 bits, blocks
of 32, the int8 default), int8 per channel (``quantize_dynamic``: ``MatMulInteger`` / ``DynamicQuantizeMatMul``)
and int4 ``MatMulNBits`` (accuracy level 4: int8 compute), quantized with the same settings as
``export.quantize.CONFIGS``.

    python benchmarks/peers/compute_bound.py --sweep [--json OUT]   # MatMulNBits settings at 1, 4 and 128 rows

``--sweep``: the same matrix through 4- and 8-bit ``MatMulNBits`` in blocks of 32 / 64 / 128, symmetric or with zero
points, accuracy level 0 (float32 compute) or 4 (int8 activations), at 1 row (decode), 4 rows (a speculative verify
pass) and 128 rows (a prompt): which setting each kernel is fastest in, for each kind of pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROWS = (1, 8, 64, 256)
SWEEP_ROWS = (1, 4, 128)  # --sweep: decode, a speculative verify pass, a prompt


def flops_per_token(n_layer: int, n_embd: int, vocab: int) -> float:
    return 2.0 * (n_layer * 12 * n_embd * n_embd + vocab * n_embd)


def _matmul_model(k: int, n: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mlp_up")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _quantized(model, scheme: str, k: int, n: int, scratch: Path, name: str | None = None, **overrides) -> Path:
    """``model`` quantized by the exporter's own quantizer with the scheme's settings (no LM head here)."""
    import onnx

    from cpm_infer.config import ModelSpec
    from export.quantize import CONFIGS
    from export.quantize_graph import quantize_graph

    name = name or scheme
    source, target = scratch / f"{name}-in.onnx", scratch / f"{name}.onnx"
    onnx.save(model, str(source))
    config = replace(CONFIGS[scheme], lm_head="float32", embedding="float32", **overrides)
    quantize_graph(source, target, ModelSpec(n_layer=1, n_head=12, n_embd=k, vocab_size=n), config)
    return target


def kernel_throughput(threads: int, k: int = 768, n: int = 3072, min_seconds: float = 0.3) -> dict:
    """{format: {rows: GFLOP/s}} for float32 / int8 / int4 matmuls of k x n weights."""
    import tempfile

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="cpm-kernels-") as scratch:
        models = {
            "float32": _matmul_model(k, n).SerializeToString(),
            "int8": str(_quantized(_matmul_model(k, n), "int8", k, n, Path(scratch))),
            "int8-per-channel": str(
                _quantized(_matmul_model(k, n), "int8", k, n, Path(scratch), "int8-per-channel", block_size=None)
            ),
            "int4": str(_quantized(_matmul_model(k, n), "int4", k, n, Path(scratch))),
        }
        for name, model in models.items():
            out[name] = _rows_throughput(_session(model, threads), k, n, min_seconds)
    return out


def nbits_sweep(threads: int, k: int = 768, n: int = 3072, min_seconds: float = 0.3) -> list[dict]:
    """Microseconds per call of one k x n ``MatMulNBits`` for each (bits, block, zero points, accuracy level), at
    ``SWEEP_ROWS`` rows."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory(prefix="cpm-nbits-") as scratch:
        settings_grid = itertools.product(("int4", "int8"), (32, 64, 128), (True, False), (0, 4))
        for scheme, block, symmetric, level in settings_grid:
            name = f"{scheme}-b{block}-{'sym' if symmetric else 'zp'}-a{level}"
            settings = {"block_size": block, "symmetric": symmetric, "accuracy_level": level, "int8_matrices": ()}
            path = _quantized(_matmul_model(k, n), scheme, k, n, Path(scratch), name, **settings)
            seconds = _rows_seconds(_session(str(path), threads), k, min_seconds, SWEEP_ROWS)
            out.append(
                {"bits": 4 if scheme == "int4" else 8, "block": block, "zero_points": not symmetric}
                | {"accuracy_level": level, "us": {rows: t * 1e6 for rows, t in seconds.items()}}
            )
    return out


def _rows_throughput(session, k: int, n: int, min_seconds: float) -> dict:
    """{rows: GFLOP/s} of ``session``'s k x n matmul at each of ``ROWS``."""
    seconds = _rows_seconds(session, k, min_seconds, ROWS)
    return {rows: 2.0 * rows * k * n / t / 1e9 for rows, t in seconds.items()}


def _rows_seconds(session, k: int, min_seconds: float, rows_list: tuple[int, ...]) -> dict:
    """{rows: seconds per call} of ``session`` on ``rows`` x k random inputs (one untimed call first)."""
    out: dict = {}
    for rows in rows_list:
        x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
        session.run(None, {"x": x})
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            session.run(None, {"x": x})
            count += 1
        out[rows] = (time.perf_counter() - start) / count
    return out


def batch_bound(t1_s: float, batch: int, flops: float, peak_gflops: float) -> float:
    """The most tokens/s at ``batch`` over batch 1 that arithmetic allows, given batch 1's step time."""
    t_batch = max(t1_s, batch * flops / (peak_gflops * 1e9))
    return batch * t1_s / t_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="MatMulNBits settings at 1, 4 and 128 rows.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = nbits_sweep(args.threads) if args.sweep else kernel_throughput(args.threads)
    if args.sweep:
        for row in result:
            times = "  ".join(f"{rows} rows {us:8.1f} us" for rows, us in row["us"].items())
            zp = "zero points" if row["zero_points"] else "symmetric"
            print(f"{row['bits']}-bit blocks of {row['block']:3d}, {zp:11s}, accuracy {row['accuracy_level']}: {times}")
    else:
        print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "result": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
