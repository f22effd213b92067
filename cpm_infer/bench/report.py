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
    """Each measurement as a dict plus its decode and first-token speedups over the eager baseline on the
    same case and sampling mode (>1 = faster than eager), and ``vs_greedy``: its decode p50 over the same
    backend's greedy decode p50 on the same case (what sampling costs; measured in the same run)."""
    base = baseline_name(results)
    reference = {(m.sampling, m.batch, m.prompt_len, m.new_tokens): m for m in results if m.backend == base}
    greedy = {(m.backend, m.batch, m.prompt_len, m.new_tokens): m for m in results if m.sampling == "greedy"}
    rows = []
    for m in results:
        row = m.to_dict()
        ref = reference.get((m.sampling, m.batch, m.prompt_len, m.new_tokens))
        row["decode_speedup"] = ref.decode_p50_ms / m.decode_p50_ms if ref else None
        row["ttft_speedup"] = ref.ttft_ms / m.ttft_ms if ref else None
        plain = greedy.get((m.backend, m.batch, m.prompt_len, m.new_tokens))
        row["vs_greedy"] = m.decode_p50_ms / plain.decode_p50_ms if plain and m.sampling != "greedy" else None
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
    ("sampling", "sampling", "{}"),
    ("sweep", "sweep", "{}"),
    ("batch", "batch", "{}"),
    ("prompt_len", "prompt", "{}"),
    ("new_tokens", "new", "{}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("decode_p50_ms", "p50 ms", "{:.2f}"),
    ("vs_greedy", "x greedy", "{:.2f}"),
    ("decode_p90_ms", "p90 ms", "{:.2f}"),
    ("gb_per_s", "GB/s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("peak_rss_mb", "RSS MB", "{:.0f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("ttft_speedup", "TTFT x", "{:.2f}"),
]
SAMPLING_COLUMNS = ("sampling", "vs_greedy")  # shown when some row sampled


GPU_COLUMN = ("gpu_peak_mb", "GPU MB", "{:.0f}")
DRAFT_COLUMNS = [("acceptance", "accepted", "{:.0%}"), ("tokens_per_pass", "tok/pass", "{:.2f}")]


def columns_for(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS, plus peak GPU memory after RSS when some row measured it (rows that did not show "-")."""
    sampled = any(r.get("sampling", "greedy") != "greedy" for r in rows)
    columns = [c for c in COLUMNS if sampled or c[0] not in SAMPLING_COLUMNS]
    if any(r.get("tokens_per_pass") is not None for r in rows):  # a runner with a draft (--draft)
        at = next(i for i, c in enumerate(columns) if c[0] == "tokens_per_s") + 1
        columns = [*columns[:at], *DRAFT_COLUMNS, *columns[at:]]
    if not any(r.get("gpu_peak_mb") is not None for r in rows):
        return columns
    at = next(i for i, c in enumerate(columns) if c[0] == "peak_rss_mb") + 1
    return [*columns[:at], GPU_COLUMN, *columns[at:]]


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
        "Sampling: "
        + "; ".join(f"`{label}` = {text}" for label, text in env.get("sampling", {"greedy": "greedy (argmax)"}).items())
        + ". EOS ignored, warm-up excluded. TTFT = time to first token (median); p50/p90 = decode "
        "ms per step of the whole batch; GB/s = bytes of weights and KV cache one decode step reads (at the mean "
        "past length) / p50 step time, the achieved memory bandwidth to compare with the machine's; "
        "tok/s = new tokens of the batch / wall time; RSS = peak resident memory of "
        "the process (all backends are loaded in it); `decode x` / `TTFT x` = speedup over the eager baseline "
        f"(`{env.get('baseline', 'hf-generate')}`, same sampling) on the same case in the same run (>1 is faster)"
        + (
            "; `x greedy` = decode p50 over the same backend's greedy decode p50 (the cost of sampling)."
            if any(r.get("vs_greedy") is not None for r in rows)
            else "."
        )
        + gpu_note,
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


def terminal_table(rows: Sequence[dict], *, compact: bool = False, width: int = 80):
    """Rich table(s) that fit in ``width`` columns without cutting a value: when all columns do not fit,
    they are split into several tables, each repeating the row's key columns. ``compact`` keeps the
    columns that matter for a single case."""
    from rich.console import Group
    from rich.table import Table

    columns = [c for c in columns_for(rows) if not compact or c[0] in COMPACT]
    cells = {key: [_cell(row, key, fmt) for row in rows] for key, _, fmt in columns}
    cells["#"] = [str(i + 1) for i in range(len(rows))]
    need = {key: max([len(title), *map(len, cells[key])]) for key, title, _ in [*columns, ("#", "#", "")]}
    keys = [c for c in columns if c[0] in ("backend", "sampling")]
    rest = [c for c in columns if c not in keys]
    widest = max((need[c[0]] + 3 for c in rest), default=0)
    if 1 + sum(need[c[0]] + 3 for c in keys) + widest > width:  # too narrow for the names: number the rows
        keys, rest = [("#", "#", "")], columns
    chunks, current = [], list(keys)
    for column in rest:  # a table costs 1 + (width + 3) per column (borders and padding)
        if len(current) > len(keys) and 1 + sum(need[c[0]] + 3 for c in [*current, column]) > width:
            chunks.append(current)
            current = list(keys)
        current.append(column)
    chunks.append(current)
    tables = []
    for i, chunk in enumerate(chunks):
        title = "decode x / TTFT x = speedup over eager (>1 is faster)" if i == 0 else None
        table = Table(title=title)
        for key, name, _ in chunk:
            justify = "left" if key in ("backend", "sampling", "sweep", "#") else "right"
            table.add_column(name, justify=justify, no_wrap=True, min_width=need[key])
        for r in range(len(rows)):
            table.add_row(*(cells[key][r] for key, _, _ in chunk))
        tables.append(table)
    return Group(*tables)


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
