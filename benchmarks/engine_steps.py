"""How long each `Engine.step` takes while long prompts join a running batch, and where the slowest steps go.

In process, no HTTP: ``--rows`` sampled rows decode (16-token prompts) while a ``--prompt``-token greedy prompt joins
every ``--every`` steps; each step is timed, and so are the engine's phases and the batch's cache operations inside
it (decode, extend, merge, select, the prefix cache's store/take). Printed: step p50 / p90 / p99 / max and the
slowest steps with their phases; ``--out`` writes the same as JSON.

    python benchmarks/engine_steps.py --model SMALL_INT4 --threads 2 --prefill-chunk 32 [--reserve]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

PHASES = ("_decode_running", "_prefill_step", "_join_ready", "_join", "_feed", "_prefill_fresh")
BATCH_OPS = ("decode", "extend", "merge", "select")


def timed(owner: Any, name: str, into: dict[str, float], label: str) -> None:
    """Wrap ``owner.name`` (where it exists) so that each call adds its seconds to ``into[label]``."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[label] = into.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--reserve", action="store_true", help="set the KV aside first, as `cpm serve` does")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=500, help="tokens of each joining prompt")
    parser.add_argument("--every", type=int, default=25, help="steps between joining prompts")
    parser.add_argument("--steps", type=int, default=260)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine import Engine
    from cpm_infer.engine.batch import DecodeBatch

    backend, tok = load_backend("auto", args.model, threads=args.threads)
    reserved = backend.reserve(args.max_rows) if args.reserve and hasattr(backend, "reserve") else 0
    engine = Engine(backend, tok, max_rows=args.max_rows, prefill_chunk=args.prefill_chunk)
    phases: dict[str, float] = {}
    for name in PHASES:
        timed(engine, name, phases, name)
    for name in BATCH_OPS:
        timed(DecodeBatch, name, phases, f"batch.{name}")
    if engine.prefix_cache is not None:
        for name in ("store", "take"):
            timed(engine.prefix_cache, name, phases, f"prefix_cache.{name}")

    rng = random.Random(0)
    vocab = backend.spec.vocab_size
    running = GenerationConfig(max_new_tokens=args.steps + 50, temperature=0.8, top_p=0.95, ignore_eos=True)
    joining = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    for i in range(args.rows):
        engine.add([rng.randrange(10, vocab - 1) for _ in range(16)], running, seed=i)
    steps = []
    for step in range(args.steps):
        if step % args.every == 5 and step < args.steps - args.every:
            engine.add([rng.randrange(10, vocab - 1) for _ in range(args.prompt)], joining, seed=step)
        phases.clear()
        start = time.perf_counter()
        engine.step()
        steps.append({"ms": 1000 * (time.perf_counter() - start), "rows": engine.live_rows,
                      "phases_ms": {k: round(1000 * v, 1) for k, v in phases.items()}})  # fmt: skip
    times = sorted(s["ms"] for s in steps)

    def pct(q: float) -> float:
        return round(times[round(q * (len(times) - 1))], 1)

    result = {
        "model": str(args.model),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kv_reserved_mib": reserved / 2**20,
        "step_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "slowest": sorted(steps, key=lambda s: -s["ms"])[:8],
    }
    print(json.dumps(result["step_ms"]))
    for s in result["slowest"]:
        print(f"{s['ms']:.1f} ms, {s['rows']} rows: {s['phases_ms']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
