"""ONNX Runtime vs eager PyTorch for CPM-small (random weights), in one process.

    python benchmarks/ort_vs_eager.py [--work-dir DIR] [--threads N] [--repeats 5] [--machine NAME]

Runners, all on the same weights: ``hf-generate`` (transformers' own ``generate()``), ``torch`` (our
generation loop over TorchBackend), ``ort`` (the exported artifact's graph with onnxruntime fusions)
and ``ort-plain`` (the same artifact's unfused portable graph). Batch 1, a 16-token prompt, 64 new
tokens, greedy, EOS ignored; one warm-up round excluded; runners interleaved round by round so that
load from other processes hits them alike; medians reported. Also decode ms/token right after a
prefill of 16 and of 900 tokens (how the per-step KV concat grows with context), and whether the 64
greedy tokens of every runner are identical (the CPM-small-shape parity check).

Writes benchmarks/results/ort_vs_eager-<machine>.json and .md. The weights use initializer_range 0.1
(not 0.02) and random biases/LayerNorms so that greedy output varies instead of repeating one token
and the parity check means something; timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = ROOT.parent / "shared" / "cpm-vocab" / "chinese_vocab.model"


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1)
    except (OSError, AttributeError):
        pass
    words = [w for w in re.sub(r"\(.*?\)|processor|\d+-core|cpu|@.*", "", model, flags=re.I).lower().split() if w]
    return "-".join([*words[:3], f"{os.cpu_count()}c"])


def prepare(work: Path, vocab: Path, seed: int, log) -> tuple[Path, Path]:
    """A CPM-small random checkpoint and its validated ONNX artifact (reused when already there)."""
    import torch
    import transformers

    from cpm_infer.artifact import read_manifest
    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.config import PRESETS
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import hf_config, save_checkpoint
    from export.onnx_export import export_onnx

    ckpt, art = work / "cpm-small-random", work / "cpm-small-onnx"
    if not (ckpt / "config.json").is_file():
        log(f"creating a random CPM-small checkpoint in {ckpt}")
        tok = CpmTokenizer(vocab)
        torch.manual_seed(seed)
        config = hf_config(PRESETS["small"], tok.eod_id, tok.pad_id, base={"initializer_range": 0.1})
        model = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():  # biases and LayerNorms random too (fresh ones are all 0 / 1)
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn_like(param))
        save_checkpoint(model, vocab, ckpt)
    if (
        not (art / "manifest.json").is_file()
        or read_manifest(art).source_sha256 != open_checkpoint(ckpt).weights_sha256()
    ):
        log(f"exporting {art} (--optimize; validated against eager)")
        export_onnx(ckpt, art, force=True, optimize=True, progress=log)
    return ckpt, art


def time_generate(backend, prompt, config, tok) -> tuple[float, float, list[int]]:
    from cpm_infer.generate import GenerationStats, generate

    stats = GenerationStats()
    result = generate(backend, [prompt], config, tok, stats=stats)
    return 1000 * stats.first_token_s, stats.decode_ms_per_step, result[0].token_ids


def time_hf_generate(model, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    """transformers' generate(): first token = a 1-token call; decode = (t_n - t_1) / (n - 1)."""
    import torch

    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return 1000 * first, 1000 * (total - first) / (new_tokens - 1), out[0, len(prompt) :].tolist()


def time_decode_at(backend, past: int, steps: int, warmup: int, vocab: int, rng) -> float:
    """Mean ms per decode step starting right after a prefill of ``past`` tokens."""
    from cpm_infer.generate import left_pad

    ids, mask, pos = left_pad([rng.integers(10, vocab, size=past).tolist()], pad_id=0)
    logits, state = backend.prefill(ids, mask, pos)
    times = []
    for step in range(warmup + steps):
        token = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, [[1]]], axis=1)
        pos = pos[:, -1:] + 1
        start = time.perf_counter()
        logits, state = backend.decode(state, token, mask, pos)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="Keep the checkpoint and artifact here (reused next time).")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="CPM SentencePiece file.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for torch and onnxruntime alike.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pasts", type=int, nargs="+", default=[16, 900])
    parser.add_argument("--past-steps", type=int, default=16, help="Timed decode steps after each past prefill.")
    parser.add_argument("--past-repeats", type=int, default=3)
    parser.add_argument("--machine", default=machine_name())
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from cpm_infer.artifact import read_manifest
    from cpm_infer.backends.ort_backend import OrtBackend, create_session
    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.torch_model import load_model

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, art = prepare(work, args.vocab, args.seed, log)
        manifest = read_manifest(art)
        model, tok = load_model(ckpt)
        runners = {"torch": TorchBackend(model)}
        runners["ort"], _ = load_ort(art, threads=args.threads)
        plain = create_session(
            art / manifest.graph_files.get("portable", manifest.graph_files["model"]), threads=args.threads
        )
        runners["ort-plain"] = OrtBackend(plain, manifest.spec, dtype=manifest.dtype)

        rng = np.random.default_rng(args.seed)
        prompt = rng.integers(10, manifest.spec.vocab_size, size=args.prompt_len).tolist()
        config = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True, ban_unk=False)
        names = ["hf-generate", *runners]
        raw: dict[str, dict[str, list[float]]] = {n: {"first_token_ms": [], "decode_ms_per_token": []} for n in names}
        tokens: dict[str, list[int]] = {}
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            for name in names:
                if name == "hf-generate":
                    first, decode, ids = time_hf_generate(model, prompt, args.new_tokens)
                else:
                    first, decode, ids = time_generate(runners[name], prompt, config, tok)
                tokens.setdefault(name, ids)
                if round_:
                    raw[name]["first_token_ms"].append(first)
                    raw[name]["decode_ms_per_token"].append(decode)
            log(
                f"round {round_}{' (warm-up)' if not round_ else ''}: "
                + ", ".join(f"{n} {raw[n]['decode_ms_per_token'][-1]:.1f} ms/token" for n in names if round_)
            )

        past_raw: dict[str, dict[str, list[float]]] = {n: {str(p): [] for p in args.pasts} for n in runners}
        for _ in range(args.past_repeats):
            for past in args.pasts:
                for name, backend in runners.items():
                    past_raw[name][str(past)].append(
                        time_decode_at(backend, past, args.past_steps, 3, manifest.spec.vocab_size, rng)
                    )
            log(
                "past sweep: "
                + ", ".join(f"{n}@{p} {past_raw[n][str(p)][-1]:.1f}" for n in runners for p in args.pasts)
            )

    med = {n: {k: statistics.median(v) for k, v in raw[n].items()} for n in names}
    best = {n: {k: min(v) for k, v in raw[n].items()} for n in names}  # least disturbed by other processes
    past_med = {n: {p: statistics.median(v) for p, v in past_raw[n].items()} for n in runners}
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": args.machine,
        "environment": environment(args.threads, load_before),
        "setup": {
            "spec": manifest.spec.to_dict(),
            "batch": 1,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_rounds": 1,
            "eos_ignored": True,
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
        "greedy_tokens_equal": {n: tokens[n] == tokens["torch"] for n in names},
        "first_mismatch": {
            n: next((i for i, (a, b) in enumerate(zip(tokens[n], tokens["torch"], strict=False)) if a != b), None)
            for n in names
        },
        "distinct_tokens": len(set(tokens["torch"])),
        "raw": raw,
        "raw_past": past_raw,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"ort_vs_eager-{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    log(f"wrote {stem}.json and {stem}.md")


def environment(threads: int, load_before: tuple[float, float, float]) -> dict:
    from cpm_infer.artifact import tool_versions

    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "tools": tool_versions(["torch", "transformers", "onnxruntime", "onnx", "numpy"]),
    }


def markdown(r: dict) -> str:
    env, s = r["environment"], r["setup"]
    lines = [
        f"# ORT vs eager PyTorch: CPM-small shape, random weights ({r['machine']})",
        "",
        f"`{r['command']}`",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads; load average before "
        f"{env['loadavg_before'][0]:.2f}, "
        f"after {env['loadavg_after'][0]:.2f}. Tools: " + ", ".join(f"{k} {v}" for k, v in env["tools"].items()) + ".",
        f"Batch {s['batch']}, {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens (greedy, EOS ignored), "
        f"median (and best) of {s['repeats']} rounds after {s['warmup_rounds']} warm-up round; ORT graph "
        f"`{s['artifact_graph']}` (fusions {s['fusions']}).",
        "",
        "| runner | first token (ms) | decode (ms/token) | best decode (ms/token) | "
        + " | ".join(f"decode at past {p} (ms/token)" for p in next(iter(r["decode_ms_per_token_at_past"].values())))
        + f" | {s['new_tokens']} greedy tokens = torch loop |",
        "|---|---:|---:|---:|" + "---:|" * len(next(iter(r["decode_ms_per_token_at_past"].values()))) + "---|",
    ]
    for name, m in r["median"].items():
        pasts = r["decode_ms_per_token_at_past"].get(name)
        past_cells = (
            " | ".join(f"{v:.1f}" for v in pasts.values())
            if pasts
            else " | ".join("-" for _ in next(iter(r["decode_ms_per_token_at_past"].values())))
        )
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
    main()
