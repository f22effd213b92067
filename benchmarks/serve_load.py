"""Load test of `cpm serve` on loopback: continuous vs static batching, the engine in-process, long prompts, a soak.

    cpm model create /tmp/cpm-small --preset small      # a random CPM-small (or any checkpoint / artifact)
    python benchmarks/serve_load.py --model /tmp/cpm-small --threads 1 --machine cpu-2core --soak-minutes 30

For each batching mode a `cpm serve` process is started (the clients run here, in threads: another process, so
they do not share the server's GIL; the server's own defaults otherwise, e.g. ``--prefill-chunk`` and the prefix
cache), then the scenarios of ``--scenarios`` (default: all; ``soak`` only with ``--soak-minutes``) run against it:

- ``probe``: the issue's case. A long sampled request (``--long-tokens``) starts; 0.5 s later a short greedy one
  (8 tokens) arrives. Reported: the short request's latency (target: continuous <= 10% of static).
- ``poisson``: open loop, requests arrive as a Poisson process (``--rate`` per second), mixed settings (greedy,
  sampled with top-k/top-p/penalties) and lengths (8-16, 32-64, 128-192 new tokens), every client streaming.
- ``closed-16``: 16 (``--clients``) concurrent streaming clients send the same mixed requests back to back
  (target: continuous tokens/s >= static's).
- ``engine``: the closed-loop requests again, through ``cpm_infer.engine.Engine`` in this process, after every
  server has stopped (so the two never share the cores): the same model, prompts turned into ids and a
  ``GenerationConfig`` as the server does (``cpm_infer.serve.completions``), ``max_rows`` = ``--max-batch``,
  ``--clients`` requests in flight (a new row whenever one finishes). Reported: engine tokens/s, and server
  (continuous ``closed-16``) / engine tokens/s (target >= 0.95).

Continuous batching only (their prompts are ``--long-prompt`` tokens, 500 by default, token ids cut from the demo's
held-out text ``cpm_infer/demo/sanguo/heldout.txt`` tokenized by the server's ``/tokenize``, each from another
offset so no two share a prefix unless meant to; a model whose context is too small for them gets shorter ones,
with a note, or the scenario is skipped):

- ``join``: ``--join-clients`` (8) streaming clients generate ``--join-tokens`` (256) tokens each, back to back;
  meanwhile every ``--join-interval`` s (2) a long-prompt request (16 new tokens) arrives, ``--join-prompts`` (10)
  of them. Reported: the running rows' inter-token latency p50/p99 while prompts join (target: p99 <= 3x p50) and
  the joining requests' time to first token.
- ``n8``: one long prompt with ``n: 8`` vs another with ``n: 1`` (8 new tokens, one request at a time,
  ``--long-repeats`` pairs, medians). Reported: TTFT n=8 / n=1 (target <= 1.5).
- ``prefix``: a long prompt + a short tail, then (after it completed) the same prefix + another tail
  (``--long-repeats`` pairs, medians). Reported: second TTFT / first TTFT (target <= 0.3) and the cached tokens
  that the server reported.
- ``soak`` (``--soak-minutes`` M, default 0 = skipped): 16 (``--clients``) clients for M minutes send the mixed
  requests, 70% streaming (a tenth of those disconnect mid-stream) and the rest not. Reported: every HTTP status
  (and in-stream errors) counted (target: no 5xx, no 504), the server's RSS (VmRSS) every ``--rss-interval`` s
  (10) as a series, after 5 minutes (half the soak when it is shorter) and at the end, and their ratio (target:
  within 10%).

The modes and the engine get exactly the same mixed requests (same seeds, ``ignore_eos`` so the lengths are as
drawn). Reported per load scenario: requests/s, generated tokens/s, time to first token p50/p99, inter-token latency
p50/p99 (gaps between streamed chunks) and end-to-end latency p50/p99. Results go to
benchmarks/results/serve_load-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
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
SCENARIOS = ("probe", "poisson", "closed", "engine", "join", "n8", "prefix", "soak")
BOTH_MODES = ("probe", "poisson", "closed")  # the others run on the continuous server (or in-process) only
HELDOUT = Path(__file__).resolve().parents[1] / "cpm_infer" / "demo" / "sanguo" / "heldout.txt"


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

    def post(self, path: str, body: dict) -> tuple[int, dict | None]:
        """A plain (not streamed) POST: its status and JSON answer."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=900)
        try:
            conn.request(
                "POST", path, json.dumps(body, ensure_ascii=False).encode(), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, None
        finally:
            conn.close()

    def stream(self, body: dict, stop: Callable[[int], bool] | None = None) -> dict:
        """One streaming completion: arrival times of its chunks (from ``start``, perf_counter), tokens, latency.
        ``stop(chunks so far)`` true: the client closes the connection there (``disconnected``)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=900)
        start = time.perf_counter()
        try:
            conn.request(
                "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                return {"status": resp.status, "error": f"{resp.status} {resp.read()[:200]!r}"}
            chunks, usage = [], None
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"status": 200, "error": event["error"]["message"]}
                if any(c["text"] for c in event["choices"]):
                    chunks.append(time.perf_counter() - start)
                    if stop is not None and stop(len(chunks)):
                        return {"status": 200, "disconnected": True, "start": start, "chunks": chunks,
                                "tokens": len(chunks), "latency": time.perf_counter() - start}  # fmt: skip
                usage = event.get("usage") or usage
            return {
                "status": 200,
                "start": start,
                "chunks": chunks,
                "tokens": usage["completion_tokens"],
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                "latency": time.perf_counter() - start,
            }
        finally:
            conn.close()

    def rss_mb(self) -> float | None:
        """The server process's resident memory (VmRSS), None where /proc has none."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

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


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b, None where either is missing (or b is 0 / nan)."""
    if a is None or b is None or not b or b != b:
        return None
    return round(a / b, digits)


# -- long prompts ---------------------------------------------------------------------------------------------------
class LongPrompts:
    """Token ids of the held-out text (the server's tokenizer), cut into prompts that start at distinct offsets (so
    no two share a leading prefix for the prefix cache), fitted to the model's context."""

    def __init__(self, server: Server, n_positions: int, length: int) -> None:
        text = HELDOUT.read_text(encoding="utf-8") if HELDOUT.exists() else "".join(PROMPTS) * 40
        status, answer = server.post("/tokenize", {"prompt": text})
        if status != 200 or not answer:
            raise SystemExit(f"/tokenize answered {status}")
        self.ids: list[int] = answer["tokens"]
        self.n_positions, self.length, self.used = n_positions, length, 0

    def fit(self, scenario: str, new_tokens: int, extra: int = 0) -> int | None:
        """Prompt length for ``scenario`` (``new_tokens`` generated, ``extra`` tokens appended): ``--long-prompt`` or
        what the context leaves; None (with a note) where that is too short to mean anything."""
        room = self.n_positions - new_tokens - extra - 1
        if room >= self.length:
            return self.length
        if room < 64:
            print(f"note: {scenario} skipped: the model's context ({self.n_positions} tokens) has no room for a long "
                  f"prompt and {new_tokens} new tokens", flush=True)  # fmt: skip
            return None
        print(f"note: the model's context is {self.n_positions} tokens: {scenario} uses {room}-token prompts instead "
              f"of {self.length}", flush=True)  # fmt: skip
        return room

    def take(self, length: int) -> list[int]:
        """A fresh prompt of ``length`` tokens (the text repeated where it is shorter)."""
        start = (self.used * 97) % len(self.ids)
        self.used += 1
        tiled = self.ids * (1 + (start + length) // len(self.ids))
        return tiled[start : start + length]


def tail_ids(server: Server, k: int) -> list[int]:
    status, answer = server.post("/tokenize", {"prompt": PROMPTS[k % len(PROMPTS)]})
    if status != 200 or not answer:
        raise SystemExit(f"/tokenize answered {status}")
    return answer["tokens"]


def ttft_ms(result: dict) -> float | None:
    return round(1000 * result["chunks"][0], 1) if result.get("chunks") else None


# -- continuous-only scenarios --------------------------------------------------------------------------------------
def join(server: Server, prompts: LongPrompts, args: argparse.Namespace) -> dict | None:
    """Running streaming rows while long prompts join: the running rows' inter-token gaps during the joins."""
    join_new = 16
    length = prompts.fit("join", join_new)
    if length is None:
        return None
    running_tokens = min(args.join_tokens, prompts.n_positions - 40)
    stop = threading.Event()
    running: list[dict] = []

    def runner(i: int) -> None:
        k = 0
        while not stop.is_set():
            body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": running_tokens, "ignore_eos": True,
                    "temperature": 0.8, "top_p": 0.95, "seed": 1000 * i + k}  # fmt: skip
            running.append(server.stream(body, stop=lambda _: stop.is_set()))
            k += 1

    def joiner(i: int, ids: list[int]) -> dict:
        time.sleep(max(0.0, start + i * args.join_interval - time.perf_counter()))
        return server.stream({"prompt": ids, "max_tokens": join_new, "ignore_eos": True, "temperature": 0, "seed": i})

    bodies = [prompts.take(length) for _ in range(args.join_prompts)]
    with ThreadPoolExecutor(args.join_clients + args.join_prompts) as pool:
        runners = [pool.submit(runner, i) for i in range(args.join_clients)]
        time.sleep(min(3.0, 2 * args.join_interval))  # the running rows are running
        start = time.perf_counter()
        joined = [pool.submit(joiner, i, ids) for i, ids in enumerate(bodies)]
        joins = [f.result() for f in joined]
        end = time.perf_counter()
        stop.set()
        for f in runners:
            f.result()
    ok = [r for r in running if "error" not in r]
    gaps = sorted(
        1000 * (b - a)
        for r in ok
        for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)
        if start <= r["start"] + a and r["start"] + b <= end
    )
    ttfts = sorted(t for t in map(ttft_ms, joins) if t is not None)
    p50, p99 = pct(gaps, 50), pct(gaps, 99)
    return {
        "prompt_tokens": length,
        "running_clients": args.join_clients,
        "running_max_tokens": running_tokens,
        "joined": len(ttfts),
        "errors": sum("error" in r for r in running + joins),
        "window_s": round(end - start, 2),
        "running_gaps": len(gaps),
        "itl_p50_ms": p50,
        "itl_p99_ms": p99,
        "itl_p99_over_p50": ratio(p99, p50),
        "join_ttft_p50_ms": pct(ttfts, 50),
        "join_ttft_p99_ms": pct(ttfts, 99),
    }


def n8(server: Server, prompts: LongPrompts, repeats: int) -> dict | None:
    """Time to first token of a long prompt with n=8 vs n=1 (a fresh prompt each, one request at a time)."""
    length = prompts.fit("n8", 8)
    if length is None:
        return None
    one, eight, errors = [], [], 0
    for r in range(repeats):
        for n, into in ((1, one), (8, eight)):
            body = {"prompt": prompts.take(length), "n": n, "max_tokens": 8, "ignore_eos": True, "temperature": 0.9,
                    "seed": r}  # fmt: skip
            t = ttft_ms(server.stream(body))
            errors += t is None
            if t is not None:
                into.append(t)
    m1, m8 = median(one), median(eight)
    return {"prompt_tokens": length, "repeats": repeats, "errors": errors, "ttft_n1_ms": m1, "ttft_n8_ms": m8,
            "ttft_n8_over_n1": ratio(m8, m1)}  # fmt: skip


def prefix(server: Server, prompts: LongPrompts, repeats: int) -> dict | None:
    """The same long prefix twice with another short tail, the second after the first completed."""
    tails = [tail_ids(server, k) for k in range(2 * repeats)]
    length = prompts.fit("prefix", 8, extra=max(map(len, tails)))
    if length is None:
        return None
    first, second, cached, errors = [], [], [], 0
    for r in range(repeats):
        head = prompts.take(length)
        for tail, into in ((tails[2 * r], first), (tails[2 * r + 1], second)):
            result = server.stream({"prompt": head + tail, "max_tokens": 8, "ignore_eos": True, "temperature": 0})
            t = ttft_ms(result)
            errors += t is None
            if t is not None:
                into.append(t)
        cached.append(result.get("cached_tokens", 0))
    m1, m2 = median(first), median(second)
    return {"prompt_tokens": length, "repeats": repeats, "errors": errors, "ttft_first_ms": m1, "ttft_second_ms": m2,
            "second_cached_tokens": cached, "ttft_second_over_first": ratio(m2, m1)}  # fmt: skip


def soak(server: Server, requests: list[dict], clients: int, minutes: float, interval: float, seed: int) -> dict:
    """``clients`` clients for ``minutes``: mixed requests, streaming or not, some disconnecting mid-stream; status
    codes counted, the server's RSS sampled."""
    duration = 60 * minutes
    statuses: Counter[str] = Counter()
    rss: list[tuple[float, float]] = []
    lock, done, counter = threading.Lock(), threading.Event(), iter(range(10**9))
    start = time.perf_counter()

    def sampler() -> None:
        while True:
            value = server.rss_mb()
            if value is not None:
                rss.append((round(time.perf_counter() - start, 1), value))
            if done.wait(interval):
                return

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        while time.perf_counter() - start < duration:
            with lock:
                i = next(counter)
            body = {**requests[i % len(requests)], "seed": i}
            try:
                if rng.random() < 0.7:
                    cut = rng.randint(1, 8) if rng.random() < 0.1 else None
                    result = server.stream(body, stop=(lambda k, cut=cut: k >= cut) if cut else None)
                    key = str(result["status"])
                    if "disconnected" in result:
                        key = "200 (client disconnected)"
                    elif "error" in result and result["status"] == 200:
                        key = "200 (error in stream)"
                else:
                    key = str(server.post("/v1/completions", body)[0])
            except OSError as exc:
                key = f"connection error ({type(exc).__name__})"
            with lock:
                statuses[key] += 1

    threading.Thread(target=sampler, daemon=True).start()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            future.result()
    done.set()
    time.sleep(0.05)
    final = server.rss_mb()
    if final is not None:
        rss.append((round(time.perf_counter() - start, 1), final))
    return {
        "minutes": minutes,
        "requests": sum(statuses.values()),
        **rss_summary(rss, duration),
        "statuses": dict(sorted(statuses.items())),
        "status_5xx": sum(n for k, n in statuses.items() if k[0] == "5"),
        "status_504": statuses.get("504", 0),
        "rss_series_mb": rss,
    }


def rss_summary(series: list[tuple[float, float]], duration_s: float) -> dict:
    """RSS after 5 minutes (or half the soak where it is shorter: the sample nearest) and at the end, and their
    ratio."""
    if not series:
        return {"rss_base_at_s": None, "rss_base_mb": None, "rss_end_mb": None, "rss_end_over_base": None}
    at = min(300.0, duration_s / 2)
    base = min(series, key=lambda p: abs(p[0] - at))
    return {"rss_base_at_s": base[0], "rss_base_mb": base[1], "rss_end_mb": series[-1][1],
            "rss_end_over_base": ratio(series[-1][1], base[1])}  # fmt: skip


# -- the engine in-process ------------------------------------------------------------------------------------------
def engine_closed_loop(engine: object, items: list[tuple[list[int], object, int | None]], clients: int) -> dict:
    """``items`` (prompt ids, GenerationConfig, seed) through ``engine``, ``clients`` in flight: a new row whenever
    one finishes, like closed-loop clients; stepped until done."""
    from cpm_infer.engine import FinishEvent

    todo = list(reversed(items))
    tokens = finished = 0
    start = time.perf_counter()

    def add() -> None:
        ids, config, seed = todo.pop()
        engine.add(ids, config, seed=seed)

    for _ in range(min(clients, len(items))):
        add()
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, FinishEvent):
                tokens += len(event.result.token_ids)
                finished += 1
                if todo:
                    add()
    wall = time.perf_counter() - start
    return {"requests": finished, "wall_s": round(wall, 2), "requests_per_s": round(finished / wall, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}  # fmt: skip


def server_settings(args: argparse.Namespace) -> object:
    """The ServeSettings of the benchmark's `cpm serve` (Server's flags, the rest default)."""
    from cpm_infer.serve.settings import ServeSettings

    return ServeSettings(max_batch=args.max_batch, batch_wait_ms=10.0, queue_size=512, max_new_tokens_cap=1024,
                         timeout_s=600.0)  # fmt: skip


def engine_run(args: argparse.Namespace, requests: list[dict]) -> dict:
    """The closed-loop requests through ``Engine`` in this process: prompts and configs made as the server makes
    them (``completion_request_model``, ``request_config``, ``encode_prompts``)."""
    from cpm_infer.backends import load_backend
    from cpm_infer.engine import Engine, max_prompt_tokens
    from cpm_infer.serve.completions import encode_prompts, request_config
    from cpm_infer.serve.schemas import completion_request_model

    backend, tok = load_backend(args.backend, args.model, threads=args.threads)
    settings = server_settings(args)
    model = completion_request_model(settings, tok.vocab_size)
    items = []
    for body in requests:
        req = model.model_validate_json(json.dumps({**body, "stream": True}))
        config = request_config(req, settings)
        (prompt,) = encode_prompts(
            tok, req, backend.spec.n_positions, config.max_new_tokens, max_prompt_tokens(backend)
        )
        items.append((prompt.ids, config, config.seed))
    reserve = getattr(backend, "reserve", None)  # as the server's warm-up does
    if reserve is not None:
        reserve(settings.max_batch)
    engine = Engine(backend, tok, max_rows=settings.max_batch, prefill_chunk=settings.prefill_chunk)
    warm = request_config(model.model_validate({"prompt": PROMPTS[0], "max_tokens": 4}), settings)
    engine_closed_loop(engine, [(tok.encode(PROMPTS[0]), warm, 0)], 1)  # as the server's warm-up request
    return {"backend": backend.name, **engine_closed_loop(engine, items, args.clients)}


def parse_scenarios(text: str) -> list[str]:
    """``--scenarios``: names from SCENARIOS (``closed-16`` and the like are ``closed``)."""
    names = ["closed" if n.strip().startswith("closed") else n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint directory or exported artifact.")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="Runtime threads of the server (and the engine).")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--scenarios",
        type=parse_scenarios,
        default=list(SCENARIOS),
        help=f"Comma-separated, from {','.join(SCENARIOS)} (default: all; soak needs --soak-minutes).",
    )
    parser.add_argument("--requests", type=int, default=48, help="Requests per load scenario.")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients of the closed loop and the soak.")
    parser.add_argument("--long-tokens", type=int, default=200, help="The probe's long request.")
    parser.add_argument("--long-prompt", type=int, default=500, help="Tokens of the join, n8 and prefix prompts.")
    parser.add_argument("--long-repeats", type=int, default=3, help="Request pairs of the n8 and prefix scenarios.")
    parser.add_argument("--join-clients", type=int, default=8, help="Running streaming clients of the join scenario.")
    parser.add_argument("--join-tokens", type=int, default=256, help="New tokens of each running request (join).")
    parser.add_argument("--join-prompts", type=int, default=10, help="Long prompts that join.")
    parser.add_argument("--join-interval", type=float, default=2.0, help="Seconds between joining prompts.")
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="Soak duration (0: no soak).")
    parser.add_argument("--rss-interval", type=float, default=10.0, help="Soak: seconds between RSS samples.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=machine_slug(), help="Name for the results files.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    chosen = set(args.scenarios)
    if args.soak_minutes <= 0:
        chosen.discard("soak")

    requests = workload(args.requests, args.seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # another busy process here skews every number
    rows, info = [], {}
    closed_name = f"closed-{args.clients}"
    for mode in MODES:
        if mode == "static" and not chosen & set(BOTH_MODES):
            continue
        server = Server(args.model, mode, args)
        try:
            info = info or server.get("/info")  # the continuous server's (limits included)
            server.stream({"prompt": PROMPTS[0], "max_tokens": 4})  # warm-up
            scenarios: dict[str, Callable[[], dict | None]] = {
                "probe": lambda s=server: probe(s, args.long_tokens),
                "poisson": lambda s=server: poisson(s, requests, args.rate, args.seed),
                closed_name: lambda s=server: closed(s, requests, args.clients),
            }
            if mode == "continuous" and chosen & {"join", "n8", "prefix"}:
                long = LongPrompts(server, info["spec"]["n_positions"], args.long_prompt)
                scenarios |= {
                    "join": lambda s=server, lp=long: join(s, lp, args),
                    "n8": lambda s=server, lp=long: n8(s, lp, args.long_repeats),
                    "prefix": lambda s=server, lp=long: prefix(s, lp, args.long_repeats),
                }
            if mode == "continuous":
                soak_requests = workload(max(256, args.requests), args.seed + 1)
                scenarios["soak"] = lambda s=server, w=soak_requests: soak(
                    s, w, args.clients, args.soak_minutes, args.rss_interval, args.seed
                )
            for name, run in scenarios.items():
                if ("closed" if name == closed_name else name) not in chosen:
                    continue
                result = run()
                if result is None:
                    continue
                row = {"mode": mode, "scenario": name, **result}
                rows.append(row)
                shown = {k: v for k, v in row.items() if k != "rss_series_mb"}
                print(json.dumps(shown), flush=True)
        finally:
            server.stop()
    if "engine" in chosen:  # every server has stopped: the engine has the cores to itself
        row = {"mode": "in-process", "scenario": "engine", **engine_run(args, requests)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    spec = info["spec"]
    by = {(r["mode"], r["scenario"]): r for r in rows}

    def get(mode: str, scenario: str, key: str) -> float | None:
        return by.get((mode, scenario), {}).get(key)

    targets = {
        "short_request_continuous_over_static": ratio(
            get("continuous", "probe", "short_latency_s"), get("static", "probe", "short_latency_s")
        ),
        "closed_tokens_per_s_continuous_over_static": ratio(
            get("continuous", closed_name, "tokens_per_s"), get("static", closed_name, "tokens_per_s")
        ),
        "closed_tokens_per_s_http_over_engine": ratio(
            get("continuous", closed_name, "tokens_per_s"), get("in-process", "engine", "tokens_per_s")
        ),
        "join_itl_p99_over_p50": get("continuous", "join", "itl_p99_over_p50"),
        "ttft_n8_over_n1": get("continuous", "n8", "ttft_n8_over_n1"),
        "ttft_prefix_second_over_first": get("continuous", "prefix", "ttft_second_over_first"),
        "soak_status_5xx": get("continuous", "soak", "status_5xx"),
        "soak_status_504": get("continuous", "soak", "status_504"),
        "soak_rss_end_over_5min": get("continuous", "soak", "rss_end_over_base"),
    }
    targets = {k: v for k, v in targets.items() if v is not None}
    meta = {
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": args.machine,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"{info['model']} ({spec['n_layer']} layers, hidden {spec['n_embd']}, vocab {spec['vocab_size']}, "
        f"context {spec['n_positions']}), backend {info['backend']}",
        "max_batch": args.max_batch,
        "threads": args.threads,
        "server_limits": info.get("limits"),
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
    def target(key: str) -> str:
        return f"**{targets[key]}**" if key in targets else "not run"

    by = {r["scenario"]: r for r in rows if r["mode"] != "static"}
    lines = [
        f"# `cpm serve` load test: {meta['machine']}",
        "",
        f"- command: `{meta['command']}`",
        f"- model: {meta['model']}; `--max-batch {meta['max_batch']}`, `--threads {meta['threads']}`; the server's "
        "defaults otherwise; every load-scenario client streams",
        f"- machine: {meta['cpu']}, {meta['cpu_count']} CPUs; load average at the start "
        f"{meta['load_average_at_start']}, at the end {meta['load_average_at_end']}; {meta['time']}",
        f"- probe: a {args.long_tokens}-token sampled request, then 0.5 s later an 8-token greedy one; short request "
        f"latency continuous / static = {target('short_request_continuous_over_static')} (target <= 0.1)",
        f"- poisson: {args.requests} mixed requests arriving at {args.rate}/s; closed-{args.clients}: the same "
        f"requests from {args.clients} clients back to back; tokens/s continuous / static = "
        f"{target('closed_tokens_per_s_continuous_over_static')} (target >= 1)",
    ]
    if "engine" in by:
        e = by["engine"]
        lines.append(
            f"- engine: the closed-{args.clients} requests through `Engine` in-process ({e['backend']}, max_rows "
            f"{meta['max_batch']}, {args.clients} in flight): {e['tokens_per_s']} tokens/s; server (continuous) / "
            f"engine = {target('closed_tokens_per_s_http_over_engine')} (target >= 0.95)"
        )
    if "join" in by:
        j = by["join"]
        lines.append(
            f"- join: {j['running_clients']} streaming clients ({j['running_max_tokens']} tokens each) while "
            f"{j['joined']} {j['prompt_tokens']}-token prompts join every {args.join_interval} s: running rows' "
            f"inter-token p50 {j['itl_p50_ms']} ms, p99 {j['itl_p99_ms']} ms, p99 / p50 = "
            f"{target('join_itl_p99_over_p50')} (target <= 3); joining TTFT p50 {j['join_ttft_p50_ms']} ms, "
            f"p99 {j['join_ttft_p99_ms']} ms; errors {j['errors']}"
        )
    if "n8" in by:
        n = by["n8"]
        lines.append(
            f"- n8: {n['prompt_tokens']}-token prompt, TTFT n=1 {n['ttft_n1_ms']} ms, n=8 {n['ttft_n8_ms']} ms "
            f"(medians of {n['repeats']}); n=8 / n=1 = {target('ttft_n8_over_n1')} (target <= 1.5)"
        )
    if "prefix" in by:
        x = by["prefix"]
        lines.append(
            f"- prefix: {x['prompt_tokens']}-token prefix + short tail, TTFT first {x['ttft_first_ms']} ms, second "
            f"{x['ttft_second_ms']} ms (medians of {x['repeats']}; cached tokens {x['second_cached_tokens']}); "
            f"second / first = {target('ttft_prefix_second_over_first')} (target <= 0.3)"
        )
    if "soak" in by:
        k = by["soak"]
        lines.append(
            f"- soak: {args.clients} clients for {k['minutes']} min, {k['requests']} requests, statuses "
            f"{k['statuses']}: 5xx {target('soak_status_5xx')}, 504 {target('soak_status_504')} (target 0); "
            f"server RSS {k['rss_base_mb']} MiB at {k['rss_base_at_s']} s, {k['rss_end_mb']} MiB at the end, ratio "
            f"{target('soak_rss_end_over_5min')} (target 0.9-1.1; the series is in the JSON)"
        )
    lines += [
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
        elif r["scenario"] == "engine":
            lines.append(f"| in-process | engine | {r['requests_per_s']} | {r['tokens_per_s']} | | | | | | | |")
        elif "ttft_p50_ms" in r:
            lines.append(
                f"| {r['mode']} | {r['scenario']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | "
                f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['latency_p50_ms']} | "
                f"{r['latency_p99_ms']} | {r['errors']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
