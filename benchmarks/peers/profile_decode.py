"""Where a decode step's time goes: onnxruntime's per-operator profile of our artifacts, plus host time.

    python benchmarks/peers/profile_decode.py ARTIFACT [ARTIFACT ...] [--batch 1] [--past 16] [--steps 32]
    python benchmarks/peers/profile_decode.py ARTIFACT --prefill --past 128 --steps 8    # a prompt's pass instead

For each artifact: prefill ``--past`` random tokens for ``--batch`` rows, then ``--steps`` greedy decode
steps through ``OrtBackend`` (the same code path as ``cpm generate``), with onnxruntime's profiler on.
Prints, per operator type, the mean microseconds per decode step and its share of the step, the sum of
the graph's own run time, and the host time around it (the Python loop, binding, argmax). Profiling adds
a little overhead per node; use it for shares, take step times from the benchmark. ``--prefill``: profile the
prefill of ``--past`` fresh random tokens instead, ``--steps`` times after one unprofiled-in-the-totals warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(artifact: Path, batch: int, past: int, steps: int, threads: int, prefill: bool = False) -> dict:
    import onnxruntime as ort

    from cpm_infer.artifact import read_manifest
    from cpm_infer.backends.ort_backend import OrtBackend

    manifest = read_manifest(artifact)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads, options.intra_op_num_threads = 1, threads
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/cpm-profile-{artifact.name}"
    session = ort.InferenceSession(str(artifact / manifest.graph_files["model"]), options)
    backend = OrtBackend(session, manifest.spec, kv_shared=manifest.details.get("kv_cache") == "shared")
    rng = np.random.default_rng(0)
    ids = rng.integers(10, manifest.spec.vocab_size, size=(batch, past), dtype=np.int64)
    mask = np.ones_like(ids)
    logits, state = backend.prefill(ids, mask, np.tile(np.arange(past), (batch, 1)))
    step_s = []
    for _ in range(steps if prefill else 0):  # each a prompt's pass over new tokens, after the one above
        ids = rng.integers(10, manifest.spec.vocab_size, size=(batch, past), dtype=np.int64)
        start = time.perf_counter()
        backend.prefill(ids, mask, np.tile(np.arange(past), (batch, 1)))
        step_s.append(time.perf_counter() - start)
    for step in range(0 if prefill else steps):
        token = logits.argmax(-1)[:, None]
        mask = np.ones((batch, past + step + 1), dtype=np.int64)
        start = time.perf_counter()
        logits, state = backend.decode(state, token, mask, np.full((batch, 1), past + step))
        step_s.append(time.perf_counter() - start)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the (first) prefill
    first_decode = decode_runs[0]["ts"] if decode_runs else 0
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first_decode:
            per_op[event["args"].get("op_name", "?")] += event["dur"]
    graph_us = sum(e["dur"] for e in decode_runs) / steps
    step_us = float(np.median(step_s)) * 1e6
    return {
        "artifact": str(artifact),
        "batch": batch,
        "past": past,
        "measured": "prefill" if prefill else "decode",
        "step_us_median": step_us,
        "graph_run_us_mean": graph_us,
        "host_us": step_us - graph_us,
        "ops_us_per_step": {k: v / steps for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--past", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", action="store_true", help="Profile the prefill of --past tokens instead.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the profiles here.")
    args = parser.parse_args()
    results = [profile(a, args.batch, args.past, args.steps, args.threads, args.prefill) for a in args.artifacts]
    for r in results:
        print(
            f"\n{r['artifact']}  batch {r['batch']}  past {r['past']}, {r['measured']}: "
            f"step {r['step_us_median']:.0f} us = graph "
            f"{r['graph_run_us_mean']:.0f} us + host {r['host_us']:.0f} us"
        )
        kernels = sum(r["ops_us_per_step"].values())
        for op, us in r["ops_us_per_step"].items():
            print(f"  {op:28s} {us:8.1f} us  {100 * us / kernels:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
