"""Benchmark reports: ratios to the eager baseline, JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from cpm_infer.bench.harness import Measurement

log = logging.getLogger(__name__)

BASELINES = ("hf-generate", "torch")  # the first one present is "eager" in ratios


def baseline_name(results: Sequence[Measurement]) -> str | None:
    names = {m.backend for m in results}
    return next((b for b in BASELINES if b in names), None)


def with_ratios(results: Sequence[Measurement]) -> list[dict]:
    """Each measurement as a dict plus its decode and first-token speedups over the eager baseline
    on the same case (>1 = faster than eager)."""
    base = baseline_name(results)
    reference = {(m.batch, m.prompt_len, m.new_tokens): m for m in results if m.backend == base}
    rows = []
    for m in results:
        row = m.to_dict()
        ref = reference.get((m.batch, m.prompt_len, m.new_tokens))
        row["decode_speedup"] = ref.decode_p50_ms / m.decode_p50_ms if ref else None
        row["ttft_speedup"] = ref.ttft_ms / m.ttft_ms if ref else None
        rows.append(row)
    return rows


def machine_slug() -> str:
    """A short name for this machine's CPU and core count (``amd-epyc-2c``): the results files are named by it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = re.search(r"model name\s*:\s*(.+)", handle.read()).group(1)
    except (OSError, AttributeError):
        pass
    words = [w for w in re.sub(r"\(.*?\)|processor|\d+-core|cpu|@.*", "", model, flags=re.I).lower().split() if w]
    return "-".join([*words[:3], f"{os.cpu_count()}c"])


def environment(extra: dict | None = None) -> dict:
    """Machine and library versions, recorded with every report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("cpm-infer", "numpy", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        **(extra or {}),
    }


COLUMNS = [
    ("backend", "backend", "{}"),
    ("sweep", "sweep", "{}"),
    ("batch", "batch", "{}"),
    ("prompt_len", "prompt", "{}"),
    ("new_tokens", "new", "{}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("decode_p50_ms", "p50 ms", "{:.2f}"),
    ("decode_p90_ms", "p90 ms", "{:.2f}"),
    ("gb_per_s", "GB/s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("peak_rss_mb", "RSS MB", "{:.0f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("ttft_speedup", "TTFT x", "{:.2f}"),
]


GPU_COLUMN = ("gpu_peak_mb", "GPU MB", "{:.0f}")


def columns_for(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS, plus peak GPU memory after RSS when some row measured it (rows that did not show "-")."""
    if not any(r.get("gpu_peak_mb") is not None for r in rows):
        return list(COLUMNS)
    at = next(i for i, c in enumerate(COLUMNS) if c[0] == "peak_rss_mb") + 1
    return [*COLUMNS[:at], GPU_COLUMN, *COLUMNS[at:]]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(rows: Sequence[dict], env: dict, command: str) -> str:
    columns = columns_for(rows)
    gpu_note = (
        " GPU MB = peak GPU memory torch allocated during the row (weights included; measured for eager rows on "
        "CUDA only, '-' elsewhere)."
        if GPU_COLUMN in columns
        else ""
    )
    lines = [
        "# cpm bench",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores), Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        "Greedy decoding, EOS ignored, warm-up excluded. TTFT = time to first token (median); p50/p90 = decode "
        "ms per step of the whole batch; GB/s = bytes of weights and KV cache one decode step reads (at the mean "
        "past length) / p50 step time, the achieved memory bandwidth to compare with the machine's; "
        "tok/s = new tokens of the batch / wall time; RSS = peak resident memory of "
        "the process (all backends are loaded in it); `decode x` / `TTFT x` = speedup over the eager baseline "
        f"(`{env.get('baseline', 'hf-generate')}`) on the same case in the same run (>1 is faster)." + gpu_note,
        "",
        *(
            [
                "Artifact load time (session creation, weights memory-mapped where ONNX Runtime allows): "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in env["load_s"].items()),
                "",
            ]
            if env.get("load_s")
            else []
        ),
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


COMPACT = ("backend", "ttft_ms", "decode_p50_ms", "gb_per_s", "tokens_per_s", "decode_speedup", "ttft_speedup")


def terminal_table(rows: Sequence[dict], *, compact: bool = False):
    """A rich table; ``compact`` keeps the columns that matter for a single case."""
    from rich.table import Table

    columns = [c for c in columns_for(rows) if not compact or c[0] in COMPACT]
    table = Table(title="decode x / TTFT x = speedup over eager (>1 is faster)")
    for _, title, _ in columns:
        table.add_column(title, justify="left" if title in ("backend", "sweep") else "right")
    for row in rows:
        table.add_row(*(_cell(row, k, f) for k, _, f in columns))
    return table


def plots(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """decode latency vs context length; throughput vs batch size (one line per backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    specs = [
        (
            "decode_vs_context.png",
            "context",
            "prompt_len",
            "decode_p50_ms",
            "context length (tokens)",
            "decode ms/step (p50)",
        ),
        ("throughput_vs_batch.png", "batch", "batch", "tokens_per_s", "batch size", "tokens/s"),
    ]
    base_row = [r for r in rows if r["sweep"] == "base"]
    for filename, sweep, x_key, y_key, x_label, y_label in specs:
        chosen = [r for r in rows if r["sweep"] == sweep] + (base_row if sweep == "batch" else [])
        if len({r[x_key] for r in chosen}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for backend in dict.fromkeys(r["backend"] for r in chosen):
            points = sorted((r[x_key], r[y_key]) for r in chosen if r["backend"] == backend)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_reports(
    results: Sequence[Measurement], out_dir: Path, *, command: str, env: dict, skipped: dict[str, str]
) -> dict:
    """bench.json, bench.md and the plots in ``out_dir``; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = with_ratios(results)
    env = {**env, "baseline": baseline_name(results)}
    report = {
        "command": command,
        "environment": env,
        "baseline": baseline_name(results),
        "skipped": skipped,
        "results": rows,
    }
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    md = markdown(rows, env, command)
    if skipped:
        md += "\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "\n"
    (out_dir / "bench.md").write_text(md, encoding="utf-8")
    return {"rows": rows, "files": [out_dir / "bench.json", out_dir / "bench.md", *plots(rows, out_dir)]}
