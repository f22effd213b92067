"""Prefix cache and chunked prefill, measured on the engine that `cpm serve` steps (no HTTP in the way).

    cpm model create /tmp/cpm-small --preset small --tokenizer chinese_vocab.model
    cpm export onnx /tmp/cpm-small /tmp/cpm-small-int4 --optimize --quantize int4
    python benchmarks/prefix_cache.py --model /tmp/cpm-small-int4 --threads 2 --repeats 5

Three scenarios, each variant run once per repeat, the variants interleaved (a busy machine slows all alike):

- ``fork``: a 500-token prompt with n=1 vs n=8 (cache off): time to first token (every row's). The n rows share
  one prefill and fork its cache.
- ``prefix``: a request of a random 500-token prefix + a 20-token tail, then a second one with the same prefix and
  another tail: time to first token of each, with the prefix cache (256 MiB, as ``cpm serve``'s default) and
  without. A fresh cache and a fresh prefix per repeat, so the first request always misses.
- ``join``: 8 rows decoding (16-token prompts) while a 500-token prompt joins every ``--join-every`` steps (and
  leaves after 2 tokens): the 8 rows' inter-token gaps (p50, p99, max), whole prefills vs ``--chunk`` tokens per
  step; and the joiners' time to first token.

Greedy, ``ignore_eos``; random token ids (the model is random too). Writes results.json to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from cpm_infer.backends import load_backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine import Engine, TokenEvent
from cpm_infer.engine.prefix_cache import PrefixCache

ROOT = Path(__file__).resolve().parents[1]
CONFIG = GenerationConfig(temperature=0, max_new_tokens=1, ignore_eos=True, ban_unk=False)


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(100, vocab - 100, size=n)]


def first_token_s(engine: Engine, prompt: list[int], n: int = 1) -> float:
    """Seconds from adding ``n`` rows of ``prompt`` to every one having its first token (the engine otherwise idle)."""
    start = time.perf_counter()
    rows = {engine.add(prompt, CONFIG, seed=0, sample_index=s) for s in range(n)}
    waiting = set(rows)
    while waiting:
        waiting -= {e.row_id for e in engine.step() if isinstance(e, TokenEvent)}
    elapsed = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return elapsed


def fork(backend, tok, rng, args) -> dict[str, float]:
    prompt = random_ids(rng, args.prompt_len, backend.spec.vocab_size)
    out = {}
    for n in (1, 8):
        out[f"n{n}"] = first_token_s(Engine(backend, tok, max_rows=8, prefix_cache=None), prompt, n)
    return out


def prefix(backend, tok, rng, args) -> dict[str, float]:
    vocab = backend.spec.vocab_size
    shared = random_ids(rng, args.prompt_len, vocab)
    first, second = shared + random_ids(rng, args.tail, vocab), shared + random_ids(rng, args.tail, vocab)
    out = {}
    for label, cache in (("cached", PrefixCache(256 * 2**20)), ("uncached", None)):
        engine = Engine(backend, tok, max_rows=8, prefix_cache=cache)
        out[f"{label}_first"] = first_token_s(engine, first)
        out[f"{label}_second"] = first_token_s(engine, second)
        if cache is not None:
            out["cached_tokens"] = cache.stats.hit_tokens
    return out


def join(backend, tok, rng, args, chunk: int) -> dict[str, list[float]]:
    """Inter-token gaps of 8 decoding rows while long prompts join; the joiners' time to first token."""
    vocab = backend.spec.vocab_size
    engine = Engine(backend, tok, max_rows=16, prefix_cache=None, prefill_chunk=chunk)
    steps = args.join_every * args.joins + 8
    running = GenerationConfig(temperature=0, max_new_tokens=steps + 4, ignore_eos=True, ban_unk=False)
    rows = {engine.add(random_ids(rng, 16, vocab), running, seed=0) for _ in range(8)}
    last: dict[int, float] = {}
    gaps: list[float] = []
    joined: dict[int, float] = {}
    ttft: list[float] = []
    for step in range(steps):
        if step >= 4 and (step - 4) % args.join_every == 0 and len(joined) < args.joins:
            row = engine.add(random_ids(rng, args.prompt_len, vocab), CONFIG.replace(max_new_tokens=2), seed=0)
            joined[row] = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            if not isinstance(event, TokenEvent):
                continue
            if event.row_id in rows:
                if event.row_id in last:
                    gaps.append(now - last[event.row_id])
                last[event.row_id] = now
            elif event.row_id in joined and joined[event.row_id] is not None:
                ttft.append(now - joined[event.row_id])
                joined[event.row_id] = None
    return {"gaps": gaps, "ttft": ttft}


def snapshot_cost(backend, rng, args, repeats: int = 5) -> dict[str, float]:
    """What the cache adds to every prefill it keeps: one ``copy_rows`` of the prompt's KV (median of ``repeats``)."""
    ids = np.asarray([random_ids(rng, args.prompt_len, backend.spec.vocab_size)])
    _, state = backend.prefill(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy = backend.copy_rows(state, np.array([0]))
        times.append(time.perf_counter() - start)
    return {"copy_ms": float(np.median(times) * 1000), "mib": backend.nbytes(copy) / 2**20}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or artifact directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--tail", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--joins", type=int, default=3)
    parser.add_argument("--join-every", type=int, default=12)
    parser.add_argument("--scenarios", default="fork,prefix,join")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "prefix-cache-intel-xeon-2c")
    args = parser.parse_args()
    backend, tok = load_backend("auto", args.model, threads=args.threads)
    rng = np.random.default_rng(0)
    first_token_s(Engine(backend, tok, prefix_cache=None), random_ids(rng, 64, backend.spec.vocab_size))  # warm up
    snapshot = snapshot_cost(backend, rng, args)
    wanted = args.scenarios.split(",")
    runs: dict[str, list] = {name: [] for name in wanted}
    joins: dict[str, dict[str, list[float]]] = {"whole": {"gaps": [], "ttft": []}, "chunked": {"gaps": [], "ttft": []}}
    for r in range(args.repeats):
        if "fork" in wanted:
            runs["fork"].append(fork(backend, tok, rng, args))
        if "prefix" in wanted:
            runs["prefix"].append(prefix(backend, tok, rng, args))
        if "join" in wanted:
            for label, chunk in (("whole", 0), ("chunked", args.chunk))[:: 1 if r % 2 == 0 else -1]:
                result = join(backend, tok, rng, args, chunk)
                for key in result:
                    joins[label][key] += result[key]
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    report = report_of(args, runs, joins)
    report["summary"]["snapshot"] = snapshot
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["summary"], indent=2))


def report_of(args, runs, joins) -> dict:
    median = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items() if rs}
    ratios = {}
    if runs.get("fork"):
        ratios["fork_n8_over_n1"] = [r["n8"] / r["n1"] for r in runs["fork"]]
    if runs.get("prefix"):
        ratios["prefix_cached_second_over_first"] = [r["cached_second"] / r["cached_first"] for r in runs["prefix"]]
        ratios["prefix_uncached_second_over_first"] = [
            r["uncached_second"] / r["uncached_first"] for r in runs["prefix"]
        ]
    out = {f"{k}_median": float(np.median(v)) for k, v in ratios.items()} | {"median_s": median}
    if joins["whole"]["gaps"]:
        out["join"] = {label: {"gaps": summary(j["gaps"]), "ttft": summary(j["ttft"])} for label, j in joins.items()}
    return {
        "command": "python benchmarks/prefix_cache.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out_dir"),
        "machine": lscpu_model(),
        "summary": out,
        "ratios": ratios,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
