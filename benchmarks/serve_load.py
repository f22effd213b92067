"""Load test of `cpm serve` on loopback: throughput and p50/p99 latency with 1, 4 and 16 concurrent
clients, dynamic batching vs one request at a time (--max-batch 1).

    cpm model create /tmp/cpm-4l --tokenizer ../shared/cpm-vocab/chinese_vocab.model --layers 4 --hidden 256 --heads 4
    python benchmarks/serve_load.py --model /tmp/cpm-4l --threads 1 --sampling default greedy --machine cpu-2core

Each mode starts its own `cpm serve` process (the clients run here, in threads: another process, so
they do not share the server's GIL). Every request asks for the same number of new tokens
(``ignore_eos``) with its own seed, so all runs do the same work. Results go to
benchmarks/results/serve-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [
    "话说天下大势，分久必合，合久必分。",
    "滚滚长江东逝水，浪花淘尽英雄。",
    "今天天气很好，我们一起去公园散步。",
    "人工智能正在改变我们的生活。",
    "白发渔樵江渚上，惯看秋月春风。",
    "春眠不觉晓，处处闻啼鸟。",
    "我的家乡在一个美丽的小山村。",
    "读书使人进步。",
]
MODES = {"batched": {"max_batch": 16, "batch_wait_ms": 10}, "one-at-a-time": {"max_batch": 1, "batch_wait_ms": 0}}
# "default": the server's sampling defaults (temperature 1, top_p 0.9: numpy sorts the vocabulary per row
# and step); "greedy": argmax only, so the model's own batching gain shows.
SAMPLING = {"default": {}, "greedy": {"temperature": 0}}


class Server:
    """`cpm serve` in a subprocess on a free port."""

    def __init__(self, model: Path, max_batch: int, batch_wait_ms: float, backend: str, threads: int | None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "cpm_infer.cli.app",
            "serve",
            "--model",
            str(model),
            "--backend",
            backend,
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--batch-wait-ms",
            str(batch_wait_ms),
            "--queue-size",
            "256",
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stderr], daemon=True).start()
        first = ""
        while "on http://" not in first:  # skip any warnings printed while the model loads
            first = lines.get(timeout=120)
            if self.proc.poll() is not None:
                raise SystemExit(f"cpm serve did not start: {first}")
        self.host, port = first.split("on http://")[1].split()[0].rsplit(":", 1)
        self.port = int(port)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.call("GET", "/health")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def call(self, method: str, path: str, body: dict | None = None, conn: http.client.HTTPConnection | None = None):
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
            conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            if own:
                conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def run_level(server: Server, clients: int, requests: int, max_new_tokens: int, sampling: dict) -> dict:
    """``requests`` completions spread over ``clients`` threads, each on its own keep-alive connection."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(requests):
        todo.put(i)
    latencies: list[float] = []
    tokens, batch_sizes, errors = [0], [], []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            body = {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_new_tokens,
                "ignore_eos": True,
                "seed": i,
                **sampling,
            }
            start = time.perf_counter()
            status, answer = server.call("POST", "/v1/completions", body, conn)
            elapsed = time.perf_counter() - start
            with lock:
                if status != 200:
                    errors.append(answer)
                    continue
                latencies.append(elapsed)
                tokens[0] += answer["usage"]["completion_tokens"]
                batch_sizes.append(answer["timings"]["batch_rows"])
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "mean_batch_size": round(statistics.mean(batch_sizes), 2),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few requests, p99 is the slowest one)."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint directory or exported artifact.")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="Runtime threads of the server.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampling", nargs="+", choices=list(SAMPLING), default=["default"])
    parser.add_argument(
        "--machine", default=f"{platform.machine()}-{os.cpu_count()}cpu", help="Name for the results files."
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    rows = []
    for mode, options in MODES.items():
        server = Server(args.model, options["max_batch"], options["batch_wait_ms"], args.backend, args.threads)
        try:
            _, info = server.call("GET", "/info")
            for i in range(2):  # warm-up
                server.call("POST", "/v1/completions", {"prompt": PROMPTS[i], "max_tokens": 4})
            for sampling in args.sampling:
                for clients in args.clients:
                    result = run_level(
                        server, clients, max(args.requests, clients), args.max_new_tokens, SAMPLING[sampling]
                    )
                    row = {"mode": mode, **options, "sampling": sampling, **result}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.stop()

    spec = info["spec"]
    meta = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": args.machine,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"{info['model']} ({spec['n_layer']} layers, hidden {spec['n_embd']}, vocab "
        "{spec['vocab_size']}), backend {info['backend']}",
        "max_tokens": args.max_new_tokens,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(meta, rows), encoding="utf-8")
    print(f"wrote {stem}.json and {stem}.md")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# `cpm serve` load test: {meta['machine']}",
        "",
        f"- command: `{meta['command']}`",
        f"- model: {meta['model']}; {meta['max_new_tokens']} new tokens per request (ignore_eos), one seed per request",
        "- sampling: default = temperature 1, top_p 0.9 (the server's defaults); greedy = temperature 0",
        f"- machine: {meta['cpu']}, {meta['cpu_count']} CPUs; load average at the end "
        f"{meta['load_average_at_end']}; {meta['time']}",
        "- batched: `--max-batch 16 --batch-wait-ms 10`; one-at-a-time: `--max-batch 1`",
        "",
        "| mode | sampling | clients | requests | req/s | tokens/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['sampling']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | "
            f"{r['tokens_per_s']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch_size']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
