"""Peak memory and wall time of ``cpm export onnx`` per export mode, for one checkpoint.

    python benchmarks/export_memory.py CHECKPOINT [--modes plain,optimize,fp16,int8,int4]
        [--name large] [--work-dir DIR] [--gate-file FILE] [--threads N] [--out DIR] [--keep]

Each mode runs ``cpm export onnx`` in its own subprocess (a fresh interpreter, so nothing of one mode
is counted in the next). Measured per mode:

- ``peak_rss``: the kernel's high-water mark of the process's resident set (``VmHWM`` of
  /proc/self/status, read by the process itself at exit): anonymous memory plus resident pages of
  memory-mapped files;
- ``peak_anon``: the highest ``RssAnon`` seen by polling /proc/PID/status every 50 ms: the part the
  kernel cannot drop under memory pressure (mapped file pages are reclaimable, anonymous ones are not);
- the progress line that was current when the RSS peaked (where the memory goes);
- wall time, and ``peak_rss / weights`` where ``weights`` is the size of the checkpoint's weight files.

Modes: ``plain`` (no flags), ``optimize`` (``--optimize``), ``fp16`` (``--fp16``), ``int8``/``int4``
(``--optimize --quantize SCHEME``: export, fusions, quantization and the quality gate in one run),
``artifact-int4``/``artifact-int8`` (``--quantize`` of the ``optimize`` mode's float32 artifact).
The quality gate runs with ``--force-quality`` (random weights: its verdict means nothing, its memory
does) on ``--gate-file`` (default: the first 1000 characters of the demo held-out chapter, ~1150
tokens with the CPM vocabulary, to bound the gate's time on CPM-large).

Results merge into ``OUT/results.json`` keyed by (name, mode), so that modes measured in separate
runs (one at a time on a shared machine) end up in one table, ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "plain": [],
    "optimize": ["--optimize"],
    "fp16": ["--fp16"],
    "int8": ["--optimize", "--quantize", "int8"],
    "int4": ["--optimize", "--quantize", "int4"],
    "artifact-int8": ["--quantize", "int8"],
    "artifact-int4": ["--quantize", "int4"],
}
GATE_CHARS = 1000


def _status(pid: int | str) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(out_file: str, argv: list[str]) -> None:
    """Run ``cpm ARGV`` in this process; at exit, write this process's peak RSS to ``out_file``."""
    import atexit

    atexit.register(lambda: Path(out_file).write_text(json.dumps(_status("self"))))
    from cpm_infer.cli.app import main

    sys.argv = ["cpm", *argv]
    main()


def measure(argv: list[str], *, threads: int | None, log_file: Path) -> dict:
    """Run ``cpm ARGV`` in a subprocess; return its peaks, wall time, the progress line at the RSS peak."""
    hwm_file = log_file.with_suffix(".hwm.json")
    hwm_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(hwm_file), "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    peak_at = 0.0
    while proc.poll() is None:
        try:
            now = _status(proc.pid)
        except (OSError, ValueError):
            break
        if now.get("VmRSS", 0) > peak["VmRSS"]:
            peak_at = time.perf_counter() - start
        for key in peak:
            peak[key] = max(peak[key], now.get(key, 0))
        time.sleep(0.05)
    code = proc.wait()
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    log_file.write_text("\n".join(f"{t:8.1f}s {line}" for t, line in lines) + "\n", encoding="utf-8")
    hwm = json.loads(hwm_file.read_text()) if hwm_file.is_file() else {}
    stage = ""
    for t, line in lines:
        if t <= peak_at and line.strip():
            stage = line.strip()
    return {
        "returncode": code,
        "wall_s": round(wall, 1),
        "peak_rss": hwm.get("VmHWM", peak["VmRSS"]),
        "peak_rss_polled": peak["VmRSS"],
        "peak_anon": peak["RssAnon"],
        "peak_file": peak["RssFile"],
        "stage_at_peak": re.sub(r"\s+", " ", stage)[:160],
        "last_lines": [line for _, line in lines[-3:]],
    }


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def weight_bytes(checkpoint: Path) -> int:
    from cpm_infer.checkpoint import open_checkpoint

    return sum(p.stat().st_size for p in open_checkpoint(checkpoint).weight_files)


def default_gate_file(work: Path) -> Path:
    text = (ROOT / "cpm_infer" / "demo" / "sanguo" / "heldout.txt").read_text(encoding="utf-8")
    path = work / "gate.txt"
    path.write_text(text[:GATE_CHARS], encoding="utf-8")
    return path


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def write_markdown(results: list[dict], path: Path) -> None:
    """The table; rows of a model named ``tiny`` (a 2-layer, 64-wide model: its weights are a few MB) give
    each mode's runtime constant, so that ``(peak - constant) / weights`` shows what scales with the model."""
    rows = sorted(results, key=lambda r: (r["weights"], list(MODES).index(r["mode"])))
    constant = {r["mode"]: r["peak_rss"] for r in results if r["name"] == "tiny" and r["returncode"] == 0}
    lines = [
        "# Export memory: peak RSS per export mode",
        "",
        "Measured by `benchmarks/export_memory.py` (each mode in its own subprocess; peak RSS = the kernel's "
        "VmHWM of that process, anon = highest RssAnon polled every 50 ms, i.e. the part that is not "
        "reclaimable mapped file pages). Bound: peak RSS <= 1.3 x weights + a constant. The constant of each mode "
        "is the peak RSS of the same export of `tiny`, a 2-layer, 64-wide model with the CPM vocabulary "
        "(interpreter, torch, transformers, onnxruntime, the gate's 1024-token window of 30000 logits).",
        "",
        "| model | mode | weights GiB | peak RSS GiB | peak RSS / weights | (peak - constant) / weights "
        "| peak anon GiB | wall s | rc | peak during |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scaled = "-"
        if r["mode"] in constant and r["name"] != "tiny":
            scaled = f"{(r['peak_rss'] - constant[r['mode']]) / r['weights']:.2f}"
        lines.append(
            f"| {r['name']} | {r['mode']} | {gib(r['weights'])} | {gib(r['peak_rss'])} | "
            f"{r['peak_rss'] / r['weights']:.2f} | {scaled} | {gib(r['peak_anon'])} | {r['wall_s']} | "
            f"{r['returncode']} | {r['stage_at_peak'][:70]} |"
        )
    lines += ["", "Commands:", ""]
    lines += sorted({f"    {r['command']}" for r in rows})
    machines = sorted({r["machine"] for r in rows})
    lines += ["", f"Machine: {', '.join(machines)}.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--modes", default="plain,optimize,fp16,int8,int4")
    parser.add_argument("--name", help="Model name in the table (default: the checkpoint's directory name).")
    parser.add_argument("--work-dir", type=Path, help="Where the artifacts go (default: next to the checkpoint).")
    parser.add_argument("--gate-file", type=Path, help="Quality-gate text (default: 1000 chars of the demo chapter).")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export-memory")
    parser.add_argument("--keep", action="store_true", help="Keep the artifacts (default: delete each after use).")
    args = parser.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    name = args.name or args.checkpoint.name
    work = args.work_dir or args.checkpoint.parent / f"{args.checkpoint.name}-export-memory"
    work.mkdir(parents=True, exist_ok=True)
    gate = args.gate_file or default_gate_file(work)
    weights = weight_bytes(args.checkpoint)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"
    try:
        for mode in modes:
            out = work / mode
            if mode.startswith("artifact-"):
                source = work / "optimize"
                if not (source / "manifest.json").is_file():
                    print(f"{mode}: needs the optimize mode's artifact in {source}; run it first", file=sys.stderr)
                    continue
            else:
                source = args.checkpoint
            argv = ["export", "onnx", str(source), str(out), "--force", *MODES[mode]]
            if "--quantize" in MODES[mode]:
                argv += ["--gate-file", str(gate), "--force-quality"]
            if args.threads:
                argv += ["--threads", str(args.threads)]
            print(f"{name} {mode}: cpm {' '.join(argv)}", file=sys.stderr, flush=True)
            row = measure(argv, threads=args.threads, log_file=work / f"{mode}.log")
            row.update(
                name=name,
                mode=mode,
                weights=weights,
                ratio=round(row["peak_rss"] / weights, 3),
                command=f"python benchmarks/export_memory.py CKPT --name {name} --modes {mode}",
                machine=machine,
                measured=time.strftime("%Y-%m-%d %H:%M"),
            )
            print(
                f"  rc {row['returncode']}, {row['wall_s']} s, peak RSS {gib(row['peak_rss'])} GiB "
                f"({row['ratio']:.2f}x weights), peak anon {gib(row['peak_anon'])} GiB at: {row['stage_at_peak']}",
                file=sys.stderr,
                flush=True,
            )
            if row["returncode"]:
                print("  " + "\n  ".join(row["last_lines"]), file=sys.stderr)
            results = [r for r in results if (r["name"], r["mode"]) != (name, mode)] + [row]
            results_file.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            write_markdown(results, args.out / "results.md")
            if not args.keep and mode != "optimize":
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work / "optimize", ignore_errors=True)


if __name__ == "__main__":
    main()
