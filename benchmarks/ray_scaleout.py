"""Scale-out on one machine: requests/s of `cpm serve` vs Ray Serve with 1 and 2 replicas, and prompts/s of
`cpm batch` (Ray Data) with 1 and 2 actors vs one `generate()` loop, on the same model and the same work.

    python benchmarks/ray_scaleout.py --model cpm_infer/demo/sanguo --machine amd-epyc-2c

A local Ray cluster on loopback with as many CPUs as the machine has: 1 replica/actor reserves all of them and runs
that many threads; 2 replicas/actors reserve half each and run half the threads, so every setup uses the same cores.
The clients run here in threads (another process than the replicas). Every request asks for the same number of
tokens (``ignore_eos``) with its own seed, greedy. Results go to benchmarks/results/ray-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [
    "话说天下大势，分久必合，合久必分。",
    "滚滚长江东逝水，浪花淘尽英雄。",
    "却说曹操引兵追赶，",
    "玄德曰：",
    "白发渔樵江渚上，惯看秋月春风。",
    "孔明笑曰：",
    "次日，关公引兵",
    "且说孙权",
]
HEADER = "x-cpm-replica"


def load(port: int, requests: int, clients: int, max_tokens: int) -> dict:
    """``requests`` completions from ``clients`` threads; throughput and latency."""
    latencies: list[float] = []
    replicas: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        began = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        assert resp.status == 200 and data["usage"]["completion_tokens"] == max_tokens, (resp.status, data)
        with lock:
            latencies.append(time.perf_counter() - began)
            replica = resp.getheader(HEADER) or "-"
            replicas[replica] = replicas.get(replica, 0) + 1

    with ThreadPoolExecutor(clients) as pool:  # warm-up: one request per client
        list(pool.map(one, range(clients)))
    latencies.clear()
    replicas.clear()
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": requests,
        "clients": clients,
        "req_per_s": round(requests / wall, 2),
        "tokens_per_s": round(requests * max_tokens / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "answers_per_replica": sorted(replicas.values(), reverse=True),
    }


def plain_server(model: Path, threads: int, settings: list[str], args: argparse.Namespace) -> dict:
    """`cpm serve` (no Ray) in a subprocess."""
    port = free_port()
    cmd = [sys.executable, "-m", "cpm_infer.cli.app", "serve", "-m", str(model), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--threads", str(threads), *settings], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "Ctrl-C" in line:
                break
        return load(port, args.requests, args.clients, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(60)


def ray_serve(model: Path, replicas: int, cpus: int, settings, args: argparse.Namespace) -> dict:
    from ray import serve

    from cpm_infer.serve.ray_app import ReplicaConfig, Scaling, application

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ReplicaConfig(model=str(model), settings=settings)
    serve.run(application(config, Scaling(replicas=replicas, cpus=cpus / replicas)), name="cpm", route_prefix="/")
    try:
        return load(port, args.requests, args.clients, args.max_tokens)
    finally:
        serve.shutdown()


def bulk(model: Path, actors: int, cpus: int, prompts_file: Path, args: argparse.Namespace) -> dict:
    from cpm_infer.bulk.job import BulkJob
    from cpm_infer.bulk.pipeline import Pool, run
    from cpm_infer.config import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True, seed=0)
    with tempfile.TemporaryDirectory() as out:
        job = BulkJob(model=str(model), output=f"{out}/o", config=config, backend="torch", batch_size=8)
        began = time.perf_counter()
        progress = run(job, [prompts_file], Pool(actors=actors, cpus=cpus / actors, prompts_per_part=16))
        wall = time.perf_counter() - began
    n = progress.done
    return {
        "prompts": n,
        "wall_s": round(wall, 1),
        "prompts_per_s": round(n / wall, 2),
        "tokens_per_s": round(n * args.max_tokens / wall, 1),
        "actors_that_worked": len(progress.workers),
    }


def single_process(model: Path, threads: int, prompts: list[str], args: argparse.Namespace) -> dict:
    """The same prompts through one `generate()` loop, batches of 8 (what `cpm generate --batch-size 8` does)."""
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    backend, tok = load_backend("torch", model, threads=threads)
    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True, seed=0)
    ids = [tok.encode(p) for p in prompts]
    began = time.perf_counter()
    for start in range(0, len(ids), 8):
        generate(backend, ids[start : start + 8], config, tok, index_offset=start)
    wall = time.perf_counter() - began
    return {"prompts": len(ids), "wall_s": round(wall, 1), "prompts_per_s": round(len(ids) / wall, 2)}


def free_port() -> int:
    from cpm_infer.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bulk-prompts", type=int, default=128)
    parser.add_argument("--machine", default="cpu")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # (before importing ray) loopback only
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a loaded machine: a slow first answer
    import ray

    from cpm_infer.serve.settings import ServeSettings

    cpus = os.cpu_count() or 1
    model = args.model.resolve()
    settings = ServeSettings(max_batch=16, batch_wait_ms=10, queue_size=64)
    flags = ["--max-batch", "16", "--batch-wait-ms", "10", "--queue-size", "64"]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(args.bulk_prompts)]
    results: dict = {"serve": {}, "bulk": {}}
    results["serve"]["cpm serve (no Ray)"] = plain_server(model, cpus, flags, args)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        for replicas in (1, 2):
            results["serve"][f"Ray Serve, {replicas} replica(s)"] = ray_serve(model, replicas, cpus, settings, args)
        with tempfile.TemporaryDirectory() as tmp:
            prompts_file = Path(tmp) / "prompts.txt"
            prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            for actors in (1, 2):
                results["bulk"][f"cpm batch, {actors} actor(s)"] = bulk(model, actors, cpus, prompts_file, args)
    finally:
        ray.shutdown()
    results["bulk"]["one generate() loop (no Ray)"] = single_process(model, cpus, prompts, args)
    write(results, args, cpus)


def write(results: dict, args: argparse.Namespace, cpus: int) -> None:
    import ray

    meta = {
        "command": "python benchmarks/ray_scaleout.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {cpus} CPUs; load average at the end {list(os.getloadavg())}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ray": ray.__version__,
        "work": f"{args.max_tokens} new tokens per prompt (greedy, ignore_eos); serve: {args.requests} requests from "
        f"{args.clients} clients after one warm-up request each; bulk: {args.bulk_prompts} prompts, batches of 8",
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"ray-{args.machine}.json").write_text(json.dumps({**meta, **results}, ensure_ascii=False, indent=2) + "\n")
    lines = [f"# Scale-out on Ray: {args.machine}", ""] + [
        f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()
    ]
    lines += [
        "",
        "| service | req/s | tokens/s | p50 ms | p99 ms | answers per replica |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results["serve"].items():
        lines.append(
            f"| {name} | {r['req_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['answers_per_replica']} |"
        )
    lines += ["", "| bulk | prompts | wall s | prompts/s | actors that worked |", "|---|---:|---:|---:|---:|"]
    for name, r in results["bulk"].items():
        lines.append(
            f"| {name} | {r['prompts']} | {r['wall_s']} | {r['prompts_per_s']} | {r.get('actors_that_worked', '-')} |"
        )
    (out / f"ray-{args.machine}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
