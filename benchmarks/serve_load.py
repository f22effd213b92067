"""Load test of `cpm serve` on loopback: continuous vs static batching on the same workload, in one run.

    cpm model create /tmp/cpm-small --preset small      # a random CPM-small (or any checkpoint / artifact)
    python benchmarks/serve_load.py --model /tmp/cpm-small --threads 1 --machine cpu-2core

For each batching mode a `cpm serve` process is started (the clients run here, in threads: another process, so
they do not share the server's GIL), then three scenarios run against it:

- ``probe``: the issue's case. A long sampled request (``--long-tokens``) starts; 0.5 s later a short greedy one
  (8 tokens) arrives. Reported: the short request's latency (target: continuous <= 10% of static).
- ``poisson``: open loop, requests arrive as a Poisson process (``--rate`` per second), mixed settings (greedy,
  sampled with top-k/top-p/penalties) and lengths (8-16, 32-64, 128-192 new tokens), every client streaming.
- ``closed-16``: 16 concurrent streaming clients send the same mixed requests back to back (target: continuous
  tokens/s >= static's).

Both modes get exactly the same requests (same seeds, ``ignore_eos`` so the lengths are as drawn). Reported per
scenario: requests/s, generated tokens/s, time to first token p50/p99, inter-token latency p50/p99 (gaps
between streamed chunks) and end-to-end latency p50/p99. Results go to benchmarks/results/serve_load-<machine>.json
and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpm_infer.bench.report import machine_slug

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
LENGTHS = [((8, 16), 0.5), ((32, 64), 0.35), ((128, 192), 0.15)]  # (new tokens range, share)
SETTINGS = [
    ({"temperature": 0}, 0.3),
    ({"temperature": 0.9, "top_p": 0.9}, 0.3),
    ({"temperature": 0.7, "top_k": 40, "repetition_penalty": 1.1}, 0.2),
    ({"temperature": 1.0, "top_p": 0.95, "presence_penalty": 0.5, "frequency_penalty": 0.5}, 0.2),
]
MODES = ("continuous", "static")


def workload(n: int, seed: int) -> list[dict]:
    """``n`` mixed requests, the same for every mode."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        (low, high), settings = _pick(rng, LENGTHS), _pick(rng, SETTINGS)
        out.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": rng.randint(low, high),
                "ignore_eos": True,
                "seed": i,
                **settings,
            }
        )
    return out


def _pick(rng: random.Random, choices: list[tuple]) -> object:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


class Server:
    """`cpm serve` in a subprocess on a free port."""

    def __init__(self, model: Path, batching: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "cpm_infer.cli.app", "serve", "--model", str(model), "--backend", args.backend]
        cmd += ["--port", "0", "--batching", batching, "--max-batch", str(args.max_batch), "--batch-wait-ms", "10"]
        cmd += ["--queue-size", "512", "--max-new-tokens-cap", "1024", "--timeout", "600"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in self.proc.stderr:
                lines.put(line)
            lines.put(None)  # the server closed stderr: it has exited

        threading.Thread(target=pump, daemon=True).start()
        first: str | None = ""
        seen: list[str] = []
        while "on http://" not in first:  # skip any warnings printed while the model loads
            first = lines.get(timeout=300)
            if first is None:
                raise SystemExit(f"cpm serve did not start: {''.join(seen[-3:]).strip()}")
            seen.append(first)
        self.host, port = first.split("on http://")[1].split()[0].rsplit(":", 1)
        self.port = int(port)

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stream(self, body: dict) -> dict:
        """One streaming completion: arrival times of its chunks, tokens, latency."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=900)
        start = time.perf_counter()
        try:
            conn.request(
                "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                return {"error": f"{resp.status} {resp.read()[:200]!r}"}
            chunks, usage = [], None
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if any(c["text"] for c in event["choices"]):
                    chunks.append(time.perf_counter() - start)
                usage = event.get("usage") or usage
            return {"chunks": chunks, "tokens": usage["completion_tokens"], "latency": time.perf_counter() - start}
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def probe(server: Server, long_tokens: int) -> dict:
    long = {"prompt": PROMPTS[0], "max_tokens": long_tokens, "ignore_eos": True, "temperature": 0.9, "seed": 1}
    short = {"prompt": PROMPTS[1], "max_tokens": 8, "ignore_eos": True, "temperature": 0, "seed": 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(server.stream, long)
        time.sleep(0.5)
        result = server.stream(short)
        long_result = first.result()
    return {"short_latency_s": round(result["latency"], 3), "long_latency_s": round(long_result["latency"], 3)}


def poisson(server: Server, requests: list[dict], rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in requests:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.perf_counter()

    def send(i: int) -> dict:
        time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        return server.stream(requests[i])

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, range(len(requests))))
    return summary(results, time.perf_counter() - start)


def closed(server: Server, requests: list[dict], clients: int) -> dict:
    todo: queue.Queue[dict] = queue.Queue()
    for body in requests:
        todo.put(body)
    results: list[dict] = []

    def client() -> None:
        while True:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            results.append(server.stream(body))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return summary(results, time.perf_counter() - start)


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft = sorted(1000 * r["chunks"][0] for r in ok if r["chunks"])
    gaps = sorted(1000 * (b - a) for r in ok for a, b in zip(r["chunks"], r["chunks"][1:], strict=False))
    latency = sorted(1000 * r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "latency_p50_ms": pct(latency, 50),
        "latency_p99_ms": pct(latency, 99),
    }


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return round(sorted_values[int(rank) - 1], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint directory or exported artifact.")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="Runtime threads of the server.")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="Requests per load scenario.")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients of the closed-loop scenario.")
    parser.add_argument("--long-tokens", type=int, default=200, help="The probe's long request.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=machine_slug(), help="Name for the results files.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    requests = workload(args.requests, args.seed)
    rows, info = [], {}
    for mode in MODES:
        server = Server(args.model, mode, args)
        try:
            info = server.get("/info")
            server.stream({"prompt": PROMPTS[0], "max_tokens": 4})  # warm-up
            scenarios = {
                "probe": lambda s=server: probe(s, args.long_tokens),
                "poisson": lambda s=server: poisson(s, requests, args.rate, args.seed),
                f"closed-{args.clients}": lambda s=server: closed(s, requests, args.clients),
            }
            for name, run in scenarios.items():
                row = {"mode": mode, "scenario": name, **run()}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()

    spec = info["spec"]
    by = {(r["mode"], r["scenario"]): r for r in rows}
    closed_name = f"closed-{args.clients}"
    targets = {
        "short_request_continuous_over_static": round(
            by["continuous", "probe"]["short_latency_s"] / by["static", "probe"]["short_latency_s"], 3
        ),
        "closed_tokens_per_s_continuous_over_static": round(
            by["continuous", closed_name]["tokens_per_s"] / by["static", closed_name]["tokens_per_s"], 3
        ),
    }
    meta = {
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": args.machine,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"{info['model']} ({spec['n_layer']} layers, hidden {spec['n_embd']}, vocab {spec['vocab_size']}), "
        f"backend {info['backend']}",
        "max_batch": args.max_batch,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_load-{args.machine}"
    payload = {"meta": meta, "targets": targets, "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(meta, targets, rows, args), encoding="utf-8")
    print(json.dumps(targets))
    print(f"wrote {stem}.json and {stem}.md")


def markdown(meta: dict, targets: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# `cpm serve` load test, continuous vs static batching: {meta['machine']}",
        "",
        f"- command: `{meta['command']}`",
        f"- model: {meta['model']}; `--max-batch {meta['max_batch']}`; every client streams",
        f"- machine: {meta['cpu']}, {meta['cpu_count']} CPUs; load average at the end "
        f"{meta['load_average_at_end']}; {meta['time']}",
        f"- probe: a {args.long_tokens}-token sampled request, then 0.5 s later an 8-token greedy one; short request "
        f"latency continuous / static = **{targets['short_request_continuous_over_static']}** (target <= 0.1)",
        f"- poisson: {args.requests} mixed requests arriving at {args.rate}/s; closed-{args.clients}: the same "
        f"requests from {args.clients} clients back to back; tokens/s continuous / static = "
        f"**{targets['closed_tokens_per_s_continuous_over_static']}** (target >= 1)",
        "",
        "| mode | scenario | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
        "latency p50 ms | latency p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["scenario"] == "probe":
            lines.append(
                f"| {r['mode']} | probe: short request {r['short_latency_s']} s "
                f"(long one {r['long_latency_s']} s) | | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['mode']} | {r['scenario']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | "
            f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['latency_p50_ms']} | "
            f"{r['latency_p99_ms']} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
