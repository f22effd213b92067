"""The memory a `cpm serve` holds: its RSS once warmed up (the KV cache set aside, `/info` says how much), and at the
peak of and after a burst of concurrent requests with prompts of 16 to 900 tokens (one per `--max-batch` row).

    python benchmarks/serve_memory.py --model ART --max-batch 8 --threads 2 --out benchmarks/results/NAME.json

RSS is read from /proc (Linux), every 0.5 s during the burst.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PROMPT_TOKENS = (16, 16, 500, 16, 900, 16, 64, 300)  # the burst's prompt lengths, one request per row (cycled)
NEW_TOKENS = 24


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        command = ["cpm", "serve", "--model", str(args.model), "--max-batch", str(args.max_batch), "--port", "0"]
        command += ["--threads", str(args.threads)] if args.threads else []
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, self.lines = None, []
        threading.Thread(target=self._pump, daemon=True).start()
        start = time.perf_counter()
        while not self._ready():
            if self.proc.poll() is not None:
                raise SystemExit("the server exited:\n" + "".join(self.lines[-20:]))
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - start

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.url is None and "http://127.0.0.1:" in line:
                self.url = "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split()[0].rstrip("/.,")

    def _ready(self) -> bool:
        if self.url is None:
            return False
        try:
            return self.get("/health")["status"] == "ok"
        except OSError:
            return False

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=600) as answer:
            return json.load(answer)

    def complete(self, ids: list[int]) -> None:
        body = {"prompt": ids, "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0.8, "seed": 1}
        request = urllib.request.Request(
            self.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as answer:
            json.load(answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    server = Server(args)
    try:
        info = server.get("/info")
        warm = rss_mib(server.proc.pid)
        rng = random.Random(0)
        vocab = info["spec"]["vocab_size"]
        room = info["spec"]["n_positions"] - NEW_TOKENS - 1  # a small model's context cuts the long prompts
        lengths = [min(room, PROMPT_TOKENS[i % len(PROMPT_TOKENS)]) for i in range(args.max_batch)]
        prompts = [[rng.randrange(10, vocab - 1) for _ in range(n)] for n in lengths]
        errors: list[BaseException] = []

        def complete(ids: list[int]) -> None:
            try:
                server.complete(ids)
            except (OSError, ValueError) as exc:  # HTTP and JSON errors: reported after the burst
                errors.append(exc)

        start = time.perf_counter()
        threads = [threading.Thread(target=complete, args=(ids,)) for ids in prompts]
        for thread in threads:
            thread.start()
        peak = warm
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, rss_mib(server.proc.pid))
            time.sleep(0.5)
        after = rss_mib(server.proc.pid)
        if errors:
            raise SystemExit(f"{len(errors)} request(s) of the burst failed: {errors[0]}")
        result = {
            "model": str(args.model),
            "spec": info["spec"],
            "max_batch": args.max_batch,
            "command": " ".join(sys.argv),
            "ready_s": round(server.ready_s, 1),
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
