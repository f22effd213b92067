"""The memory a `cpm serve` holds: its RSS once warmed up (the KV cache set aside, `/info` says how much), and at the
peak of and after a burst of concurrent requests with prompts of 16 to 900 tokens (one per `--max-batch` row).

    python benchmarks/serve_memory.py --model ART --max-batch 8 --threads 2 --out benchmarks/results/NAME.json

RSS is read from /proc (Linux), every 0.5 s during the burst.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

from serve_load import Server  # the `cpm serve` subprocess the load test drives (run as a script: benchmarks/ on path)

PROMPT_TOKENS = (16, 16, 500, 16, 900, 16, 64, 300)  # the burst's prompt lengths, one request per row (cycled)
NEW_TOKENS = 24


def start_server(args: argparse.Namespace) -> tuple[Server, float]:
    """`cpm serve` as the load test starts it (``serve_load.Server``, continuous batching), and the seconds until it
    answers ``/health`` (warm-up, and with it the KV set aside, done)."""
    began = time.perf_counter()
    server = Server(args.model, "continuous", args)
    while True:
        try:
            if server.get("/health").get("status") == "ok":
                return server, time.perf_counter() - began
        except OSError:
            pass
        if server.proc.poll() is not None:
            raise SystemExit(f"the server exited with status {server.proc.returncode}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    server, ready_s = start_server(args)
    try:
        info = server.get("/info")
        warm = server.rss_mb()
        if warm is None:
            raise SystemExit("the server's RSS is read from /proc: Linux only")
        rng = random.Random(0)
        vocab = info["spec"]["vocab_size"]
        room = info["spec"]["n_positions"] - NEW_TOKENS - 1  # a small model's context cuts the long prompts
        lengths = [min(room, PROMPT_TOKENS[i % len(PROMPT_TOKENS)]) for i in range(args.max_batch)]
        prompts = [[rng.randrange(10, vocab - 1) for _ in range(n)] for n in lengths]
        errors: list[BaseException] = []

        def complete(ids: list[int]) -> None:
            body = {"prompt": ids, "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0.8, "seed": 1}
            try:
                status, answer = server.post("/v1/completions", body)
            except OSError as exc:  # reported after the burst
                errors.append(exc)
                return
            if status != 200:
                errors.append(RuntimeError(f"HTTP {status}: {answer}"))

        start = time.perf_counter()
        threads = [threading.Thread(target=complete, args=(ids,)) for ids in prompts]
        for thread in threads:
            thread.start()
        peak = warm
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, server.rss_mb())
            time.sleep(0.5)
        after = server.rss_mb()
        if errors:
            raise SystemExit(f"{len(errors)} request(s) of the burst failed: {errors[0]}")
        result = {
            "model": str(args.model),
            "spec": info["spec"],
            "max_batch": args.max_batch,
            "command": " ".join(sys.argv),
            "ready_s": round(ready_s, 1),
            "kv_reserved_mib": info["kv_cache_reserved_bytes"] / 2**20,
            "rss_after_warmup_mib": round(warm),
            "rss_peak_under_burst_mib": round(max(peak, after)),
            "rss_after_burst_mib": round(after),
            "burst_s": round(time.perf_counter() - start, 1),
            "burst_prompt_tokens": lengths,
            "new_tokens": NEW_TOKENS,
        }
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
