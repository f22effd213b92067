"""ONNX Runtime vs eager PyTorch for CPM-small (random weights), in one process.

    python benchmarks/ort_vs_eager.py [--work-dir DIR] [--threads N] [--repeats 5] [--machine NAME]

Runners, all on the same weights, all timed by ``cpm_infer.bench`` (its runners and harness, as ``cpm
bench``): ``hf-generate`` (transformers' own ``generate()``), ``torch`` (our generation loop over
TorchBackend), ``ort`` (the exported artifact's graph with onnxruntime fusions) and ``ort-plain`` (the same
artifact's unfused portable graph). Batch 1, a 16-token prompt, 64 new tokens, greedy, EOS ignored; one
warm-up round excluded; runners interleaved round by round so that load from other processes hits them
alike; medians reported (first token = time to the first new token; decode = mean ms per later step). Also
decode ms/token right after a prefill of 16 and of 900 tokens (``harness.measure`` on a one-row case of that
prompt length: how the per-step KV concat grows with context), and whether the 64 greedy tokens of every
runner are identical (the CPM-small-shape parity check).

Writes benchmarks/results/ort_vs_eager-<machine>.json and .md. The model is ``cpm_infer.bench.setup.
parity_model`` (initializer_range 0.1, random biases/LayerNorms, so greedy output varies and the parity check
means something); ``--checkpoint DIR`` benchmarks an existing checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cpm_infer.errors import CpmError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = ROOT.parent / "shared" / "cpm-vocab" / "chinese_vocab.model"
RUNNERS = ("hf-generate", "torch", "ort", "ort-plain")


def main() -> None:
    from cpm_infer.bench.report import machine_slug

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="Keep the checkpoint and artifact here (reused next time).")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="CPM SentencePiece file.")
    parser.add_argument("--checkpoint", type=Path, help="Benchmark this checkpoint instead of a random CPM-small.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for torch and onnxruntime alike.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pasts", type=int, nargs="+", default=[16, 900])
    parser.add_argument("--past-steps", type=int, default=16, help="Timed decode steps after each past prefill.")
    parser.add_argument("--past-repeats", type=int, default=3)
    parser.add_argument("--machine", default=machine_slug())
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from cpm_infer.artifact import read_manifest
    from cpm_infer.backends.ort_backend import OrtBackend, create_session
    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.bench import harness, report
    from cpm_infer.bench.runners import HFGenerateRunner, LoopRunner
    from cpm_infer.bench.setup import ensure_artifact, parity_model
    from cpm_infer.torch_model import load_model

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.checkpoint:
            ckpt, art = args.checkpoint, ensure_artifact(args.checkpoint, work / "onnx", say=log)
        else:
            ckpt, art = parity_model(work, args.vocab, seed=args.seed, say=log)
        manifest = read_manifest(art)
        model, _ = load_model(ckpt)
        plain = create_session(
            art / manifest.graph_files.get("portable", manifest.graph_files["model"]), threads=args.threads
        )
        runners = [
            HFGenerateRunner(model),
            LoopRunner("torch", TorchBackend(model)),
            LoopRunner("ort", load_ort(art, threads=args.threads)[0]),
            LoopRunner("ort-plain", OrtBackend(plain, manifest.spec, dtype=manifest.dtype)),
        ]

        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(10, manifest.spec.vocab_size, size=(1, args.prompt_len))
        raw: dict[str, dict[str, list[float]]] = {n: {"first_token_ms": [], "decode_ms_per_token": []} for n in RUNNERS}
        tokens: dict[str, list[int]] = {}
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            for runner in runners:
                timing = runner.run(prompts, args.new_tokens)
                tokens.setdefault(runner.name, timing.token_ids[0])
                if round_:
                    raw[runner.name]["first_token_ms"].append(1000 * timing.first_token_s)
                    raw[runner.name]["decode_ms_per_token"].append(1000 * float(np.mean(timing.step_s)))
            if round_:
                log(
                    f"round {round_}: "
                    + ", ".join(f"{n} {raw[n]['decode_ms_per_token'][-1]:.1f} ms/token" for n in RUNNERS)
                )

        loop_runners = [r for r in runners if isinstance(r, LoopRunner)]
        past_med: dict[str, dict[str, float]] = {r.name: {} for r in loop_runners}
        for past in args.pasts:
            case = harness.Case(1, past, args.past_steps + 1, "context")
            past_prompts = harness.make_prompts(case, manifest.spec.vocab_size, seed=args.seed)
            for runner in loop_runners:
                m = harness.measure(runner, case, past_prompts, repeats=args.past_repeats)
                past_med[runner.name][str(past)] = m.decode_p50_ms
            log("past " + str(past) + ": " + ", ".join(f"{n} {v[str(past)]:.1f}" for n, v in past_med.items()))

    med = {n: {k: statistics.median(v) for k, v in raw[n].items()} for n in RUNNERS}
    best = {n: {k: min(v) for k, v in raw[n].items()} for n in RUNNERS}  # least disturbed by other processes
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": args.machine,
        "environment": report.environment(
            {"threads": args.threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        ),
        "setup": {
            "spec": manifest.spec.to_dict(),
            "batch": 1,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_rounds": 1,
            "eos_ignored": True,
            "timing": "cpm_infer.bench runners (hf-generate: per-step logits-processor clock)",
            "artifact_graph": manifest.graph_files["model"],
            "validation": manifest.details.get("validation"),
            "fusions": manifest.details.get("fusions"),
        },
        "median": med,
        "best": best,
        "decode_ms_per_token_at_past": past_med,
        "ratios": {
            f"{n}/{base}": med[n]["decode_ms_per_token"] / med[base]["decode_ms_per_token"]
            for n in ("ort", "ort-plain")
            for base in ("torch", "hf-generate")
        },
        "ratios_best": {
            f"{n}/{base}": best[n]["decode_ms_per_token"] / best[base]["decode_ms_per_token"]
            for n in ("ort", "ort-plain")
            for base in ("torch", "hf-generate")
        },
        "greedy_tokens_equal": {n: tokens[n] == tokens["torch"] for n in RUNNERS},
        "first_mismatch": {
            n: next((i for i, (a, b) in enumerate(zip(tokens[n], tokens["torch"], strict=False)) if a != b), None)
            for n in RUNNERS
        },
        "distinct_tokens": len(set(tokens["torch"])),
        "raw": raw,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"ort_vs_eager-{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    log(f"wrote {stem}.json and {stem}.md")


def markdown(r: dict) -> str:
    env, s = r["environment"], r["setup"]
    pasts = list(next(iter(r["decode_ms_per_token_at_past"].values())))
    lines = [
        f"# ORT vs eager PyTorch: CPM-small shape, random weights ({r['machine']})",
        "",
        f"`{r['command']}`",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads; load average before "
        f"{env['loadavg_before'][0]:.2f}, after {env['loadavg_after'][0]:.2f}. Tools: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        f"Batch {s['batch']}, {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens (greedy, EOS ignored), "
        f"median (and best) of {s['repeats']} rounds after {s['warmup_rounds']} warm-up round; ORT graph "
        f"`{s['artifact_graph']}` (fusions {s['fusions']}). Timing: {s['timing']}.",
        "",
        "| runner | first token (ms) | decode (ms/token) | best decode (ms/token) | "
        + " | ".join(f"decode at past {p} (ms/token)" for p in pasts)
        + f" | {s['new_tokens']} greedy tokens = torch loop |",
        "|---|---:|---:|---:|" + "---:|" * len(pasts) + "---|",
    ]
    for name, m in r["median"].items():
        at = r["decode_ms_per_token_at_past"].get(name)
        past_cells = " | ".join(f"{at[p]:.1f}" if at else "-" for p in pasts)
        equal = "yes" if r["greedy_tokens_equal"][name] else f"no (first differs at {r['first_mismatch'][name]})"
        lines.append(
            f"| {name} | {m['first_token_ms']:.1f} | {m['decode_ms_per_token']:.1f} | "
            f"{r['best'][name]['decode_ms_per_token']:.1f} | {past_cells} | {equal} |"
        )
    lines += [
        "",
        "Decode ratios of medians (target: ort/torch <= 0.5): "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
        + ".",
        "Ratios of best rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios_best"].items()) + ".",
        f"Greedy output had {r['distinct_tokens']} distinct tokens out of {s['new_tokens']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except CpmError as exc:
        raise SystemExit(f"error: {exc}") from exc
