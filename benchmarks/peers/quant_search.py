"""int4 recipes on the Pareto front of next-token KL from float32 vs decode ms/token (CPU, batch 1).

    flock -x /tmp/cpm-heavy.lock python benchmarks/peers/quant_search.py --work-dir /tmp/quant-search --threads 2

Every candidate is built by the exporter's own quantizer (``export.quantize_graph`` with
``export.quant_config.config_for(scheme, recipe, **overrides)``, as ``peers_bench.quantized_artifact``), from the
``--optimize`` float32 ONNX artifact; the quality gate of ``cpm export onnx --quantize`` is not run.

- Quality (``cpm_infer/demo/sanguo`` and its held-out chapter, as ``peers_bench.quality``): reference float32
  eager PyTorch; over non-overlapping 256-token windows, teacher forcing at every position: mean
  KL(reference || candidate) of the next-token distribution, top-1 agreement, perplexity.
- Speed (the CPM-small-shape random model of ``peers_bench``, 12 layers, 768 wide, vocab 30000; the same
  recipe): batch 1, 16-token prompt, 33 new tokens greedy, decode ms/token = mean of the 32 decode steps.
  Rounds are interleaved (every candidate once per round, the order reversed every other round); each
  candidate's ratio to the baseline (``BASELINE``, the recipe that was the int4 default) in the same round,
  median over rounds: a slow spell of a shared machine hits both sides of a ratio.
- ``--sensitivity``: one matrix type, the LM head, the embedding or one layer quantized to 4 bits (two
  settings: round-to-nearest symmetric blocks of 128, k-quant blocks of 64) while the rest stays float32,
  ranked by KL: which matrices deserve more bits.

Writes ``benchmarks/results/quant-search-<machine>/{results.json,NOTE.md}`` (the note's prose is kept when it
exists: the tables between its markers are replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The sibling modules import as top-level ones: the script's folder is first on sys.path when it runs.
from ctranslate2_bench import DEFAULT_VOCAB
from peers_bench import NEW, PROMPT, WINDOW, log_softmax, nll, quantized_artifact

from cpm_infer.bench.report import machine_slug

ROOT = Path(__file__).resolve().parents[2]
TYPES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
KQ = {"algorithm": "k_quant", "symmetric": False, "embedding": "float32"}


def recipe(
    block: int, *, kq: bool = False, sym: bool = True, head: str = "int4", int8: tuple = (), int8_block: int = 32
) -> tuple[str, dict]:
    """An int4 candidate: the embedding float32, 4-bit blocks of ``block`` (k-quant, or round to nearest with or
    without zero points), the LM head ``head``, the block matrices ``int8`` at 8 bits (blocks of ``int8_block``)."""
    overrides = {"recipe": "fast", "embedding": "float32", "block_size": block, "lm_head": head}
    if kq or not sym:
        overrides |= {"symmetric": False} | ({"algorithm": "k_quant"} if kq else {})
    if int8_block != 32:
        overrides["int8_block_size"] = int8_block
    return "int4", overrides | ({"int8_matrices": list(int8)} if int8 else {})


# name -> (scheme, overrides of export.quant_config.config_for; "recipe" picks the starting recipe).
BASELINE = "int4-fast"
CANDIDATES: dict[str, tuple[str, dict]] = {
    "int4-fast": ("int4", {"recipe": "fast"}),  # the former default: symmetric 128, 4-bit embedding and head
    "int4-sym128": recipe(128),
    "int4-asym128": recipe(128, sym=False),
    "int4-kq128": recipe(128, kq=True),
    "int4-kq64": recipe(64, kq=True),
    "int4-kq32": recipe(32, kq=True),
    "int4-sym128-int8head": recipe(128, head="int8"),
    "int4-sym32-int8head": recipe(32, head="int8"),
    "int4-asym128-int8head": recipe(128, sym=False, head="int8"),
    "int4-kq128-int8head": recipe(128, kq=True, head="int8"),
    "int4-kq64-int8head": recipe(64, kq=True, head="int8"),
    "int4-kq32-int8head": recipe(32, kq=True, head="int8"),
    "int4-kq32-f32head": recipe(32, kq=True, head="float32"),
    # q4_K_M's idea: the most sensitive matrices at more bits (here the first block, or every attn.c_attn).
    "int4-sym128-h0.8-int8head": recipe(128, head="int8", int8=("h.0",)),
    "int4-asym128-h0.8-int8head": recipe(128, sym=False, head="int8", int8=("h.0",)),
    "int4-kq128-h0.8-int8head": recipe(128, kq=True, head="int8", int8=("h.0",)),
    "int4-kq64-h0.8-int8head": recipe(64, kq=True, head="int8", int8=("h.0",)),
    "int4-kq128-qkv8-int8head": recipe(128, kq=True, head="int8", int8=("attn.c_attn",)),
    "int4-kq128-h0.8-int8head-i8b128": recipe(128, kq=True, head="int8", int8=("h.0",), int8_block=128),
    "int4 (default)": ("int4", {}),  # = recipe(128, head="int8", int8=("h.0",), int8_block=128): its own config
    "int8": ("int8", {}),
}
SENSITIVITY_BASES = {
    "sym128": {"recipe": "fast", "embedding": "float32", "lm_head": "float32"},
    "kq64": {"recipe": "fast", **KQ, "block_size": 64, "lm_head": "float32"},
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sensitivity_candidates(n_layer: int) -> dict[str, tuple[str, dict]]:
    """One part at 4 bits, the rest float32, for each base setting."""
    out = {}
    for base_name, base in SENSITIVITY_BASES.items():
        for kind in TYPES:
            out[f"only-{kind}-{base_name}"] = ("int4", {**base, "float32_matrices": [t for t in TYPES if t != kind]})
        out[f"only-lm_head-{base_name}"] = ("int4", {**base, "float32_matrices": list(TYPES), "lm_head": "int4"})
        if base_name == "sym128":  # the 4-bit embedding is round to nearest whatever the MatMuls' algorithm
            out[f"only-embedding-{base_name}"] = (
                "int4",
                {**base, "float32_matrices": list(TYPES), "embedding": "int4"},
            )
        for layer in range(n_layer):
            others = [f"h.{i}" for i in range(n_layer) if i != layer]
            out[f"only-h.{layer}-{base_name}"] = ("int4", {**base, "float32_matrices": others})
    return out


# -- quality ---------------------------------------------------------------------------------------


class Quality:
    """The demo model's windows and float32 eager reference logits, computed once."""

    def __init__(self, work: Path, threads: int) -> None:
        import torch

        from cpm_infer.backends.torch_backend import TorchBackend
        from cpm_infer.demo import demo_model_dir
        from cpm_infer.tokenizer import CpmTokenizer
        from cpm_infer.torch_model import load_model
        from export.onnx_export import export_onnx

        torch.set_num_threads(threads)
        demo = demo_model_dir()
        self.threads = threads
        self.fp32 = work / "demo-fp32"
        if not (self.fp32 / "manifest.json").is_file():
            export_onnx(demo, self.fp32, optimize=True, threads=threads, progress=say)
        tok = CpmTokenizer(demo / "spiece.model")
        ids = np.array(tok.encode((demo / "heldout.txt").read_text(encoding="utf-8")), dtype=np.int64)
        self.windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
        model, _ = load_model(demo)
        say("quality: float32 eager reference")
        self.reference = [self._logits(TorchBackend(model), w) for w in self.windows]
        self.reference_ppl = float(
            np.exp(np.mean([nll(r, w) for r, w in zip(self.reference, self.windows, strict=True)]))
        )

    @staticmethod
    def _logits(backend, window: np.ndarray) -> np.ndarray:
        x = window[None, :]
        return np.asarray(backend.logits_all(x, np.ones_like(x), np.arange(len(window))[None, :])[0], np.float32)

    def measure(self, artifact: Path) -> dict:
        """KL(reference || artifact), top-1 agreement, perplexity (peers_bench.compare's formulas)."""
        from cpm_infer.backends.ort_backend import load as load_ort

        backend = load_ort(artifact, threads=self.threads)[0]
        kls, top1, nlls = [], [], []
        for ref, window in zip(self.reference, self.windows, strict=True):
            got = self._logits(backend, window)
            lp, lq = log_softmax(ref[:-1]), log_softmax(got[:-1])
            kls.append((np.exp(lp) * (lp - lq)).sum(-1))
            top1.append(ref[:-1].argmax(-1) == got[:-1].argmax(-1))
            nlls.append(nll(got, window))
        del backend
        return {
            "kl_mean": float(np.concatenate(kls).mean()),
            "top1_agreement": float(np.concatenate(top1).mean()),
            "ppl": float(np.exp(np.mean(nlls))),
        }


def build(fp32: Path, work: Path, prefix: str, name: str, scheme: str, overrides: dict) -> tuple[Path, float]:
    """The candidate's artifact (reused when current) and the seconds its quantization took (0 when reused)."""
    start = time.perf_counter()
    folder = "".join(c if c.isalnum() or c in ".-" else "-" for c in name).strip("-")
    path = quantized_artifact(fp32, work / f"{prefix}-{folder}", scheme, overrides)
    return path, time.perf_counter() - start


# -- speed -----------------------------------------------------------------------------------------


def time_speed(artifacts: dict[str, Path], rounds: int, threads: int, vocab: int) -> dict[str, list[float]]:
    """{candidate: [decode ms/token, one per round]}, rounds interleaved, order reversed every other round."""
    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.bench.runners import LoopRunner

    engines = {name: LoopRunner(name, load_ort(path, threads=threads)[0]) for name, path in artifacts.items()}
    prompt = np.random.default_rng(0).integers(10, vocab, size=(1, PROMPT), dtype=np.int64)
    for name, runner in engines.items():
        say(f"warm-up {name}")
        runner.run(prompt, 8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for name in names if r % 2 == 0 else reversed(names):
            timing = engines[name].run(prompt, NEW)
            times[name].append(1e3 * sum(timing.step_s) / len(timing.step_s))
    return times


def decode_cpu_ms(backend, prompt: np.ndarray, steps: int) -> float:
    """Process CPU milliseconds per greedy decode step after prefilling ``prompt`` (1, P). With one thread the
    step runs on the calling thread: its CPU time is the step's work (memory stalls included), whatever else
    the machine runs, where wall-clock time also counts the time the process waited for a core."""
    length = prompt.shape[1]
    mask = np.ones((1, length + steps), dtype=np.int64)
    logits, state = backend.prefill(prompt, mask[:, :length], np.arange(length, dtype=np.int64)[None, :])
    start = time.process_time()
    for t in range(steps):
        token = np.asarray(logits).reshape(1, -1).argmax(-1).astype(np.int64)[:, None]
        position = np.array([[length + t]], dtype=np.int64)
        logits, state = backend.decode(state, token, mask[:, : length + t + 1], position)
    return (time.process_time() - start) / steps * 1e3


def time_cpu(artifacts: dict[str, Path], rounds: int, vocab: int) -> dict[str, list[float]]:
    """{candidate: [decode CPU ms/token on one thread, one per round]}, rounds interleaved as ``time_speed``."""
    from cpm_infer.backends.ort_backend import load as load_ort

    backends = {name: load_ort(path, threads=1)[0] for name, path in artifacts.items()}
    prompt = np.random.default_rng(0).integers(10, vocab, size=(1, PROMPT), dtype=np.int64)
    for backend in backends.values():
        decode_cpu_ms(backend, prompt, 4)
    times: dict[str, list[float]] = {name: [] for name in backends}
    names = list(backends)
    for r in range(rounds):
        say(f"CPU-time round {r + 1}/{rounds}")
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(decode_cpu_ms(backends[name], prompt, NEW - 1))
    return times


def decode_mib(artifact: Path) -> float:
    """MiB of weights a decode step reads: every initializer but the embedding tables (a Gather reads one row
    per token), from the graph's tensor shapes (quantized blocks, scales, zero points, float weights)."""
    import onnx
    from onnx import helper

    from cpm_infer.artifact import read_manifest

    graph = onnx.load(str(artifact / read_manifest(artifact).graph_files["model"]), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    gathered |= {i for n in graph.node if n.op_type == "GatherBlockQuantized" for i in n.input[1:]}
    used_elsewhere = {i for n in graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    total = 0
    for tensor in graph.initializer:
        if tensor.name in gathered and tensor.name not in used_elsewhere:
            continue
        bits = 4 if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else None
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if bits is None else 0.5
        total += size * itemsize
    return total / 2**20


def paired(times: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


# -- report ----------------------------------------------------------------------------------------

BEGIN, END = "<!-- tables: written by quant_search.py -->", "<!-- end of tables -->"


def tables(report: dict) -> str:
    env = report["environment"]
    lines = [
        BEGIN,
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; load average "
        f"{env['loadavg_before'][0]:.2f} before, {env['loadavg_after'][0]:.2f} after; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        f"Quality: {report['quality_setup']}. Speed: {report['speed_setup']}",
        "",
        f"| candidate | mean KL | top-1 | perplexity | MiB read per token | CPU ms/token (1 thread) | CPU ratio | "
        f"wall ms/token ({env['threads']} threads) | wall ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["candidates"].items():
        speed = row.get("speed") or {}
        cells = (
            [f"{speed[k]:.2f}" if "ms" in k else f"{speed[k]:.3f}" for k in ("cpu_median_ms", "cpu_ratio")]
            + [f"{speed[k]:.2f}" if "ms" in k else f"{speed[k]:.3f}" for k in ("median_ms", "ratio")]
            if speed
            else ["", "", "", ""]
        )
        lines.append(
            f"| {name} | {row['kl_mean']:.2e} | {row['top1_agreement']:.4f} | {row['ppl']:.3f} | "
            f"{row.get('decode_mib', '')} | " + " | ".join(cells) + " |"
        )
    lines += ["", "What each candidate's manifest says its matrices became:", ""]
    lines += [f"- {name}: {row['recipe']}" for name, row in report["candidates"].items()]
    if report.get("sensitivity"):
        lines += [
            "",
            "Sensitivity (demo model): one part at 4 bits, everything else float32, by KL.",
            "",
            "| part at 4 bits | setting | mean KL | top-1 |",
            "|---|---|---:|---:|",
        ]
        rows = sorted(report["sensitivity"].items(), key=lambda kv: (kv[1]["setting"], -kv[1]["kl_mean"]))
        for _, row in rows:
            lines.append(f"| {row['part']} | {row['setting']} | {row['kl_mean']:.2e} | {row['top1_agreement']:.4f} |")
    return "\n".join([*lines, "", END])


def write_note(out: Path, report: dict) -> None:
    path = out / "NOTE.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# int4 recipe search\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + tables(report) + tail, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="Checkpoints and artifacts (reused).")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="CPM SentencePiece file.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", nargs="*", help="Candidate names (default: all).")
    parser.add_argument("--sensitivity", action="store_true", help="Also rank the parts of the model by KL.")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--cpu-rounds", type=int, default=15, help="Rounds of the one-thread CPU-time timing.")
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite NOTE.md from --out-dir's results.json, measure nothing."
    )
    parser.add_argument("--machine", default=machine_slug())
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="Default: benchmarks/results/quant-search-<machine>."
    )
    args = parser.parse_args()
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"quant-search-{args.machine}"
    if args.render_only:
        render(out, args.work_dir)
        return
    from cpm_infer.bench import report as bench_report
    from cpm_infer.bench.setup import parity_model

    args.work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    candidates = dict(CANDIDATES)
    if args.only:
        unknown = set(args.only) - set(candidates)
        if unknown:
            raise SystemExit(f"error: unknown candidates {sorted(unknown)}; known: {', '.join(candidates)}")
        candidates = {name: candidates[name] for name in candidates if name in {*args.only, BASELINE}}
    quality = Quality(args.work_dir, args.threads)
    rows: dict[str, dict] = {}
    for name, (scheme, overrides) in candidates.items():
        path, _ = build(quality.fp32, args.work_dir, "demo", name, scheme, overrides)
        from export.quantize import quantization_details

        details = quantization_details(path) or {}
        rows[name] = {"scheme": scheme, "overrides": overrides, "recipe": recipe_text(details), **quality.measure(path)}
        say(f"{name}: KL {rows[name]['kl_mean']:.2e}, top-1 {rows[name]['top1_agreement']:.4f}")
    sensitivity = {}
    if args.sensitivity:
        from cpm_infer.artifact import read_manifest

        n_layer = read_manifest(quality.fp32).spec.n_layer
        for name, (scheme, overrides) in sensitivity_candidates(n_layer).items():
            path, _ = build(quality.fp32, args.work_dir, "demo-sens", name, scheme, overrides)
            part, _, setting = name.removeprefix("only-").rpartition("-")
            sensitivity[name] = {"part": part, "setting": setting, **quality.measure(path)}
            say(f"{name}: KL {sensitivity[name]['kl_mean']:.2e}")
    if not args.skip_speed:
        _, small = parity_model(args.work_dir, args.vocab, say=say)
        artifacts = {"fp32": small}
        for name, (scheme, overrides) in candidates.items():
            say(f"quantizing CPM-small: {name}")
            artifacts[name], seconds = build(small, args.work_dir, "small", name, scheme, overrides)
            from export.quantize import quantization_details

            details = quantization_details(artifacts[name]) or {}
            rows[name]["small_weights_mib"] = details.get("weights_mib")
            rows[name]["decode_mib"] = round(decode_mib(artifacts[name]), 1)
            if seconds > 1:
                rows[name]["small_quantize_s"] = round(seconds, 1)
        times = time_speed(artifacts, args.rounds, args.threads, 30000)
        cpu = time_cpu(artifacts, args.cpu_rounds, 30000)
        for name in candidates:
            rows[name]["speed"] = {
                "median_ms": statistics.median(times[name]),
                "ratio": paired(times, name, BASELINE),
                "rounds_ms": [round(t, 3) for t in times[name]],
                "cpu_median_ms": statistics.median(cpu[name]),
                "cpu_ratio": paired(cpu, name, BASELINE),
                "cpu_rounds_ms": [round(t, 3) for t in cpu[name]],
            }
        rows["fp32 (reference)"] = {
            "scheme": "float32",
            "overrides": {},
            "recipe": "float32 ONNX graph",
            **quality.measure(quality.fp32),
            "decode_mib": round(decode_mib(small), 1),
            "speed": {
                "median_ms": statistics.median(times["fp32"]),
                "ratio": paired(times, "fp32", BASELINE),
                "rounds_ms": [round(t, 3) for t in times["fp32"]],
                "cpu_median_ms": statistics.median(cpu["fp32"]),
                "cpu_ratio": paired(cpu, "fp32", BASELINE),
                "cpu_rounds_ms": [round(t, 3) for t in cpu["fp32"]],
            },
        }
    env = bench_report.environment(
        {
            "threads": args.threads,
            "rounds": args.rounds,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
    )
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": env,
        "quality_setup": (
            f"cpm_infer/demo/sanguo (4 layers, 256 wide, vocab 8000), heldout.txt, {len(quality.windows)} windows "
            f"of {WINDOW} tokens, teacher forcing ({len(quality.windows) * (WINDOW - 1)} predictions); reference "
            f"float32 eager PyTorch (perplexity {quality.reference_ppl:.3f})"
        ),
        "speed_setup": (
            f"CPM-small-shape random model (12 layers, 768 wide, vocab 30000), batch 1, {PROMPT}-token prompt, "
            f"{NEW} new tokens greedy. Wall: decode ms/token with {args.threads} threads, median of {args.rounds} "
            f"interleaved rounds. CPU: process CPU ms per decode step with 1 thread (the step's work, not the time "
            f"spent waiting for a core), median of {args.cpu_rounds} interleaved rounds. Ratios: median over rounds "
            f"of the candidate's time / {BASELINE}'s in the same round. MiB read per token: the weights a decode step "
            "reads (every initializer but the embedding tables), from the graph"
        ),
        "baseline": BASELINE,
        "candidates": rows,
        "sensitivity": sensitivity,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    write_note(out, report)
    print(tables(report))
    say(f"wrote {out}/results.json, NOTE.md")


def recipe_text(details: dict) -> str:
    """What a candidate's manifest says its matrices became, by precision: "int4 rtn b128: h.1-3; int8 rtn b128:
    h.0, lm_head; float32: embedding" (h.A-B: every block matrix of those layers)."""

    def span(layers: tuple[int, ...]) -> str:
        return f"h.{layers[0]}" if len(layers) == 1 else f"h.{layers[0]}-{layers[-1]}"

    groups: dict[str, list[tuple[str, tuple[int, ...] | None]]] = {}
    for matrix, entries in (details.get("matrices") or {}).items():
        for entry in entries:
            key = entry["precision"]
            if key != "float32":
                key += f" {entry.get('algorithm', 'rtn')} b{entry.get('block_size')}"
                key += " zp" if entry.get("zero_points") else ""
            layers = entry.get("layers")
            groups.setdefault(key, []).append((matrix, None if layers is None else tuple(sorted(layers))))
    parts = []
    for key, items in groups.items():
        blocks = [(m, layers) for m, layers in items if layers is not None]
        if len(blocks) == len(TYPES) and len({layers for _, layers in blocks}) == 1:
            names = [span(blocks[0][1])]
        else:
            names = [f"{m} {span(layers)}" for m, layers in blocks]
        parts.append(f"{key}: {', '.join(names + [m for m, layers in items if layers is None])}")
    return "; ".join(parts)


def render(out: Path, work: Path) -> None:
    """Rewrite ``out``'s NOTE.md tables from its results.json (no measurement), the recipe descriptions read
    again from the candidates' demo artifacts in ``work``."""
    from export.quantize import quantization_details

    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for name, row in report["candidates"].items():
        folder = "".join(c if c.isalnum() or c in ".-" else "-" for c in name).strip("-")
        details = quantization_details(work / f"demo-{folder}")
        if details is not None:
            row["recipe"] = recipe_text(details)
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    write_note(out, report)


if __name__ == "__main__":
    main()
