"""The attention kernel at long context: onnxruntime's CPU GroupQueryAttention with a float32, int8 or int4 KV cache.

    python benchmarks/peers/kv_attention.py [--threads 2] [--past 16,900] [--json OUT]

One CPM-small layer (12 heads of 64) decoding one token with the cache shared in place (past and present
bound to one buffer of 1024 slots, as ``OrtBackend`` runs ``kv_cache: shared`` artifacts). Cache formats:
``float32`` (what our artifacts use) and the quantized caches onnxruntime 1.32's CPU kernel supports
(``T_CACHE`` int8 / packed int4 with static per-channel scales, ``k_quant_type = v_quant_type =
PER_CHANNEL``; float16 is not a CPU cache type). Reported per format and past length: microseconds per
layer call, the KV bytes it reads, the bandwidth that implies, and the largest difference of the attention
output from the float32 cache (random unit-variance keys/values, scales from each channel's absolute max).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

N_HEAD, HEAD, CAPACITY = 12, 64, 1024


def _graph(cache_type: int, attrs: dict, scales: bool):
    from onnx import TensorProto, helper

    hidden = N_HEAD * HEAD
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, hidden]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info(n, cache_type, [1, N_HEAD, "cap", "packed"]) for n in ("pk", "pv")]
    inputs += [
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    names = ["q", "k", "v", "pk", "pv", "seqlens", "total"]
    if scales:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [hidden]) for n in ("ks", "vs")]
        names += ["", "", "", "", "", "ks", "vs"]
    node = helper.make_node(
        "GroupQueryAttention",
        names,
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=N_HEAD,
        kv_num_heads=N_HEAD,
        **attrs,
    )
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(n, cache_type, None) for n in ("present_k", "present_v")]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8)


def _int4(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    nibbles = (np.clip(np.round(x / scale), -8, 7).astype(np.int16) + 8).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # even index in the low nibble


def formats(keys: np.ndarray, values: np.ndarray) -> dict:
    """name -> (cache element type, GQA attributes, key cache, value cache, key scales, value scales)."""
    from onnx import TensorProto

    def channel_max(x):
        return np.abs(x).max(axis=(0, 2), keepdims=True)  # (1, nh, 1, hs)

    out = {"float32": (TensorProto.FLOAT, {}, keys.copy(), values.copy(), None, None)}
    for bits, levels, cache_type, pack in ((8, 127, TensorProto.INT8, _int8), (4, 7, TensorProto.UINT8, _int4)):
        ks, vs = channel_max(keys) / levels, channel_max(values) / levels
        attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
        out[f"int{bits}"] = (
            cache_type,
            attrs,
            pack(keys, ks),
            pack(values, vs),
            ks.reshape(-1).astype(np.float32),
            vs.reshape(-1).astype(np.float32),
        )
    return out


def measure(threads: int, pasts: list[int], min_seconds: float = 0.5) -> list[dict]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, N_HEAD, CAPACITY, HEAD)).astype(np.float32)
    values = rng.standard_normal((1, N_HEAD, CAPACITY, HEAD)).astype(np.float32)
    q, k, v = (rng.standard_normal((1, 1, N_HEAD * HEAD)).astype(np.float32) for _ in range(3))
    rows = []
    for past in pasts:
        reference = None
        for name, (cache_type, attrs, kc, vc, ks, vs) in formats(keys, values).items():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            graph = _graph(cache_type, attrs, ks is not None)
            session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
            kc, vc = kc.copy(), vc.copy()  # each run appends its new key/value at slot ``past``
            feeds = {"q": q, "k": k, "v": v, "seqlens": np.array([past], np.int32), "total": np.array(past + 1)}
            feeds["total"] = feeds["total"].astype(np.int32)
            if ks is not None:
                feeds.update(ks=ks, vs=vs)
            io = session.io_binding()
            for feed, array in feeds.items():
                io.bind_cpu_input(feed, array)
            for past_name, present_name, cache in (("pk", "present_k", kc), ("pv", "present_v", vc)):
                io.bind_input(past_name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
                io.bind_output(present_name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
            out = np.empty((1, 1, N_HEAD * HEAD), np.float32)
            io.bind_output("out", "cpu", 0, np.float32, out.shape, out.ctypes.data)
            session.run_with_iobinding(io)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_seconds:
                session.run_with_iobinding(io)
                count += 1
            seconds = (time.perf_counter() - start) / count
            if reference is None:
                reference = out.copy()
            read = 2 * (past + 1) * N_HEAD * kc.shape[-1] * kc.itemsize
            rows.append(
                {
                    "format": name,
                    "past": past,
                    "us_per_layer": seconds * 1e6,
                    "kv_bytes_read": read,
                    "gb_per_s": read / seconds / 1e9,
                    "max_abs_diff_vs_float32": float(np.abs(out - reference).max()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", default="16,900")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.threads, [int(p) for p in args.past.split(",")])
    print("| KV cache | past | us per layer | KV MB read | GB/s | max diff vs float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['format']} | {r['past']} | {r['us_per_layer']:.1f} | {r['kv_bytes_read'] / 1e6:.2f} | "
            f"{r['gb_per_s']:.1f} | {r['max_abs_diff_vs_float32']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
