"""Decode speed of ONNX artifacts next to their physical floor: weight bytes per step / memory bandwidth.

    python benchmarks/decode_floor.py ARTIFACT [ARTIFACT ...] [--batch 1,8] [--prompt-len 100]
        [--new-tokens 32] [--repeats 2] [--threads 2] [--out DIR]

Per artifact: the load time (``load_backend``: session creation, external weights memory-mapped), the
time to first token of a ``--prompt-len`` prompt and the decode ms per step (median) at each batch size,
through our generation loop (greedy, EOS ignored, one warm-up run excluded), and the floor of a decode
step: every weight a step multiplies with is read once per step (embedding tables are looked up one row
per token and not counted), so a step cannot take less than those bytes / the machine's read bandwidth.

The bandwidth is measured here, in the same process, before the models load: ``--threads`` threads each
sum their own part of a 1 GiB float32 array (numpy releases the GIL), best of 5. Results go to
``OUT/decode_floor.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GATHERS = ("Gather", "GatherBlockQuantized")


def read_bandwidth(threads: int, size: int = 2**30, rounds: int = 5) -> float:
    """Bytes per second that ``threads`` threads read from memory (sum of a float32 array, best round)."""
    data = np.ones(size // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(rounds):
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def step_weight_bytes(artifact: Path) -> tuple[int, int]:
    """(bytes of the weights a decode step multiplies with, bytes of every weight) of the artifact's graph."""
    from cpm_infer.artifact import read_manifest
    from export.onnx_weights import load_graph, nbytes

    model = load_graph(artifact / read_manifest(artifact).graph_files["model"])
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = streamed = 0
    for tensor in model.graph.initializer:
        size = nbytes(tensor)
        total += size
        if not readers.get(tensor.name, set()) <= set(GATHERS):
            streamed += size
    return streamed, total


def main() -> None:
    from cpm_infer.backends import load_backend
    from cpm_infer.bench import harness, report
    from cpm_infer.bench.runners import LoopRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    default_out = ROOT / "benchmarks" / "results" / f"decode-floor-{report.machine_slug()}"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    rows = []
    for artifact in args.artifacts:
        streamed, total = step_weight_bytes(artifact)
        start = time.perf_counter()
        backend, _ = load_backend("ort", artifact, device="cpu", threads=args.threads)
        load_s = time.perf_counter() - start
        runner = LoopRunner(artifact.name, backend)
        for batch in batches:
            case = harness.Case(batch, args.prompt_len, args.new_tokens, "batch")
            prompts = harness.make_prompts(case, backend.spec.vocab_size)
            m = harness.measure(runner, case, prompts, repeats=args.repeats)
            row = {
                "artifact": artifact.name,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "load_s": round(load_s, 1),
                "weights_gb": round(total / 1e9, 3),
                "step_weights_gb": round(streamed / 1e9, 3),
                "ttft_ms": round(m.ttft_ms, 1),
                "decode_ms": round(m.decode_p50_ms, 2),
                "floor_ms": round(streamed / bandwidth * 1000, 2),
                "peak_rss_gb": round(m.peak_rss_mb / 1024, 2),
            }
            row["decode_over_floor"] = round(row["decode_ms"] / row["floor_ms"], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        backend.close()
        del backend, runner

    args.out.mkdir(parents=True, exist_ok=True)
    env = report.environment({"threads": args.threads, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2)})
    command = "python benchmarks/decode_floor.py " + " ".join(sys.argv[1:])
    (args.out / "decode_floor.json").write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=2))
    lines = [
        "# Decode speed vs the memory-bandwidth floor",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores), {args.threads} threads; read bandwidth measured "
        f"{bandwidth / 1e9:.1f} GB/s (numpy sum of 1 GiB in {args.threads} threads, best of 5).",
        "",
        "floor = bytes of the weights one decode step multiplies with / read bandwidth (embedding tables, read "
        "one row per token, excluded). Greedy, EOS ignored, warm-up excluded, median decode step of the batch.",
        "",
        "| artifact | batch | load s | weights GB | per-step weights GB | TTFT ms (prompt "
        f"{args.prompt_len}) | decode ms/step | floor ms | decode / floor | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['artifact']} | {r['batch']} | {r['load_s']} | {r['weights_gb']} | {r['step_weights_gb']} | "
            f"{r['ttft_ms']} | {r['decode_ms']} | {r['floor_ms']} | {r['decode_over_floor']} | {r['peak_rss_gb']} |"
        )
    (args.out / "decode_floor.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
