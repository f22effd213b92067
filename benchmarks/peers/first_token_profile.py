"""Where our time to the first token goes: the graph run against the host work around it.

    python benchmarks/peers/first_token_profile.py /tmp/llpeers/cpm-small-int4 --prompt 128 --runs 15 \
        --json benchmarks/results/peers-llamacpp-native-intel-xeon-2c/first_token_profile.json

Times ``generate`` for one token of a fresh random prompt the way ``peers_bench.py``'s ``pf128`` case does (our
``LoopRunner``, after an untimed call of the same shape), then runs the same calls under ``cProfile`` and reports,
per call, the seconds inside onnxruntime's ``run_with_iobinding`` (the graph), inside the prefix cache's ``store``
(the copy of the prompt's KV rows it keeps for later prompts) and the rest of our loop, for each artifact given.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
from pathlib import Path

import numpy as np

from cpm_infer.backends.ort_backend import load as load_ort
from cpm_infer.bench.runners import LoopRunner

# (file suffix, function name) of the profiled parts
PARTS = {
    "graph_ms": ("", "run_with_iobinding"),
    "prefix_cache_store_ms": ("prefix_cache.py", "store"),
}


def profile(artifact: Path, prompt: int, runs: int, threads: int, seed: int = 0) -> dict:
    backend = load_ort(artifact, threads=threads)[0]
    runner = LoopRunner(artifact.name, backend)
    vocab = backend.spec.vocab_size
    rng = np.random.default_rng(seed)

    def fresh() -> np.ndarray:
        return rng.integers(10, vocab, size=(1, prompt), dtype=np.int64)

    timed = []
    for _ in range(runs):
        runner.run(fresh(), 1)  # untimed call of the same shape first, as the peer script does
        timed.append(runner.run(fresh(), 1).first_token_s)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        runner.run(fresh(), 1)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    parts = {}
    for key, (suffix, name) in PARTS.items():
        seconds = sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(suffix))
        parts[key] = seconds / runs * 1e3
    total = sum(v[2] for v in stats.values()) / runs * 1e3
    return {
        "artifact": str(artifact),
        "prompt": prompt,
        "runs": runs,
        "first_token_ms_median": statistics.median(timed) * 1e3,
        "profiled_call_ms": total,
        **parts,
        "other_ms": total - sum(parts.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [profile(a, args.prompt, args.runs, args.threads) for a in args.artifacts]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
