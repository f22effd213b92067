"""Speculative decoding, measured: a target with and without a draft, and what a verify pass costs.

``pair``: the target alone and with the draft on the same prompts (the held-out chapter's paragraphs), batch 1,
greedy and the CLI's default sampling, runs interleaved prompt by prompt: tokens/s of each, the ratio, the share of
proposals accepted and tokens per target pass; greedy outputs are compared token for token.

``cost``: the target's decode of 1 token and its verify pass of k+1 tokens at a fixed past, and the draft's decode
of 1 token, each the median of ``--repeats`` timed calls (the cache is cropped back after each). From these and an
acceptance rate (``--acceptance``, and a ``pair`` run's measured one) it computes the speedup speculative decoding
would give with k proposals, under the usual model of independent acceptances (Leviathan et al. 2023): a pass makes
(1 - a^(k+1)) / (1 - a) tokens and costs verify(k+1) + k x draft decode. Stated as computed, not measured.

``numerics``: how far the logits of a verify pass (k new positions in one run) are from those of k one-token
decodes, over several pasts and k: what decides whether greedy text with a draft is the text without it token for
token (a near-tie closer than this gap can go either way).

    python benchmarks/speculative.py pair --target ART --draft ART|ngram --out DIR
    python benchmarks/speculative.py cost --target ART --draft ART --acceptance 0.7,0.9 --out DIR
    python benchmarks/speculative.py numerics --target ART --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cpm_infer.backends import load_backend
from cpm_infer.bench.report import environment
from cpm_infer.bench.runners import parse_sampling
from cpm_infer.engine.generate import GenerationStats, generate
from cpm_infer.engine.speculative import NGRAM, open_draft
from cpm_infer.ort_pool import allow_shared_pool
from cpm_infer.settings import DRAFT_TOKENS

DEMO_TEXT = Path(__file__).resolve().parents[1] / "cpm_infer" / "demo" / "sanguo" / "heldout.txt"


def held_out_prompts(path: Path, count: int, chars: int) -> list[str]:
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if len(p.strip()) > chars // 2]
    return [p[:chars] for p in paragraphs[:count]]


def pair(args: argparse.Namespace) -> dict:
    # Alone: the model as `cpm generate` runs it without a draft; with the draft: a second instance, whose
    # onnxruntime sessions open_draft moves to one shared pool of threads (OrtBackend.join_pool).
    alone_backend, tok = load_backend("auto", args.target, threads=args.threads)
    target, _ = load_backend("auto", args.target, threads=args.threads)
    draft = open_draft(args.draft if args.draft == NGRAM else Path(args.draft), target, tok, threads=args.threads)
    prompts = [tok.encode(text) for text in held_out_prompts(args.text, args.prompts, args.prompt_chars)]
    rows = []
    for label in ("greedy", "default"):
        config = parse_sampling(label).config(args.new_tokens)
        plain_s = draft_s = 0.0
        plain_n = draft_n = proposed = accepted = passes = emitted = mismatches = 0
        generate(alone_backend, [prompts[0]], config.replace(max_new_tokens=8), tok)  # warm all three
        generate(target, [prompts[0]], config.replace(max_new_tokens=8), tok, draft=draft)
        for _ in range(args.repeats):
            for prompt in prompts:
                start = time.perf_counter()
                alone = generate(alone_backend, [prompt], config, tok)[0]
                plain_s += time.perf_counter() - start
                stats = GenerationStats()
                start = time.perf_counter()
                drafted = generate(
                    target, [prompt], config, tok, draft=draft, draft_tokens=args.draft_tokens, stats=stats
                )[0]
                draft_s += time.perf_counter() - start
                plain_n, draft_n = plain_n + len(alone.token_ids), draft_n + len(drafted.token_ids)
                spec = stats.speculation
                proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
                plain_steps = len(drafted.token_ids) - 1 - spec.emitted  # decode steps that did not speculate
                passes, emitted = passes + spec.passes + plain_steps, emitted + spec.emitted + plain_steps
                mismatches += label == "greedy" and alone.token_ids != drafted.token_ids
        rows.append(
            {
                "sampling": label,
                "plain_tok_s": plain_n / plain_s,
                "draft_tok_s": draft_n / draft_s,
                "speedup": (draft_n / draft_s) / (plain_n / plain_s),
                "acceptance": accepted / proposed if proposed else None,
                "tokens_per_pass": emitted / passes if passes else None,
                "greedy_mismatches": mismatches if label == "greedy" else None,
                "runs": args.repeats * len(prompts),
            }
        )
    draft.close()
    target.close()
    alone_backend.close()
    return {"kind": "pair", "target": str(args.target), "draft": str(args.draft), "rows": rows}


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _costs(backend, past: int, sizes: list[int], repeats: int, seed: int = 0) -> dict[int, float]:
    """ms of one pass of T new tokens after ``past`` (T = 1: decode; T > 1: the verify pass), cache cropped back."""
    rng = np.random.default_rng(seed)
    vocab = backend.spec.vocab_size
    ids = rng.integers(10, vocab, size=(1, past))
    _, state = backend.prefill(ids, np.ones_like(ids), np.arange(past)[None, :])
    holder = {"state": state}
    out = {}
    for size in sizes:
        new = rng.integers(10, vocab, size=(1, size))
        mask, pos = np.ones((1, past + size), np.int64), np.arange(past, past + size)[None, :]

        def one(new=new, mask=mask, pos=pos, size=size):
            call = backend.decode if size == 1 else backend.extend_all
            _, st = call(holder["state"], new, mask, pos)
            holder["state"] = backend.crop(st, past)

        one()  # warm this shape
        out[size] = _median_ms(one, repeats)
    return out


def expected_tokens(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def cost(args: argparse.Namespace) -> dict:
    ks = [int(k) for k in args.k.split(",")]
    target, _ = load_backend("auto", args.target, threads=args.threads)
    target_ms = _costs(target, args.past, [1, *[k + 1 for k in ks]], args.repeats)
    target.close()
    draft, _ = load_backend("auto", args.draft, threads=args.threads)
    draft_ms = _costs(draft, args.past, [1], args.repeats)[1]
    draft.close()
    alphas = [float(a) for a in args.acceptance.split(",")] if args.acceptance else []
    if args.pair_json:
        rows = json.loads(Path(args.pair_json).read_text())["rows"]
        alphas.append(next(r["acceptance"] for r in rows if r["sampling"] == args.pair_sampling))
    rows = []
    for k in ks:
        per_pass = target_ms[k + 1] + k * draft_ms
        rows.append(
            {
                "k": k,
                "verify_ms": target_ms[k + 1],
                "verify_over_decode": target_ms[k + 1] / target_ms[1],
                "pass_ms": per_pass,
                "computed_speedup": {str(a): expected_tokens(a, k) * target_ms[1] / per_pass for a in alphas},
            }
        )
    return {
        "kind": "cost",
        "target": str(args.target),
        "draft": str(args.draft),
        "past": args.past,
        "decode_ms": target_ms[1],
        "draft_decode_ms": draft_ms,
        "acceptance": alphas,
        "rows": rows,
    }


def numerics(args: argparse.Namespace) -> dict:
    """Max |logit difference| between one verify pass of k tokens and k one-token decodes after the same past."""
    backend, _ = load_backend("auto", args.target, threads=args.threads)
    rng = np.random.default_rng(args.seed)
    vocab = backend.spec.vocab_size
    ks, pasts = [int(k) for k in args.k.split(",")], [int(p) for p in args.pasts.split(",")]
    rows = []
    for past in pasts:
        diffs = {}
        for k in ks:
            ids = rng.integers(10, vocab, size=(1, past + k))
            _, state = backend.prefill(ids[:, :past], np.ones((1, past), np.int64), np.arange(past)[None, :])
            mask, pos = np.ones((1, past + k), np.int64), np.arange(past, past + k)[None, :]
            together, state = backend.extend_all(state, ids[:, past:], mask, pos)
            together, state = np.array(together[0]), backend.crop(state, past)
            one = []
            for j in range(k):
                at = past + j
                logits, state = backend.decode(state, ids[:, at : at + 1], np.ones((1, at + 1), np.int64), [[at]])
                one.append(np.array(logits[0]))
            diffs[str(k)] = float(np.abs(together - np.stack(one)).max())
        rows.append({"past": past, "max_abs_diff": diffs})
    backend.close()
    return {"kind": "numerics", "target": str(args.target), "draft": "-", "k": ks, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = [f"# Speculative decoding: {result['kind']}", "", f"`{command}`", ""]
    lines.append(f"target `{result['target']}`, draft `{result['draft']}`")
    lines.append("")
    if result["kind"] == "pair":
        lines += [
            "| sampling | tok/s alone | tok/s with draft | speedup | accepted | tokens/pass | greedy mismatches |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
            tpp = "-" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}"
            mism = "-" if r["greedy_mismatches"] is None else str(r["greedy_mismatches"])
            lines.append(
                f"| {r['sampling']} | {r['plain_tok_s']:.1f} | {r['draft_tok_s']:.1f} | {r['speedup']:.2f}x "
                f"| {acc} | {tpp} | {mism} |"
            )
    elif result["kind"] == "numerics":
        lines += ["max |logit difference|, verify pass of k positions vs k one-token decodes:", ""]
        lines += ["| past | " + " | ".join(f"k={k}" for k in result["k"]) + " |", "|---" * (1 + len(result["k"])) + "|"]
        for r in result["rows"]:
            lines.append(
                f"| {r['past']} | " + " | ".join(f"{r['max_abs_diff'][str(k)]:.1e}" for k in result["k"]) + " |"
            )
    else:
        lines.append(
            f"past {result['past']}: target decode {result['decode_ms']:.2f} ms, draft decode "
            f"{result['draft_decode_ms']:.2f} ms ({result['draft_decode_ms'] / result['decode_ms']:.2f}x)"
        )
        alphas = result["acceptance"]
        head = " | ".join(f"x at a={a:.2f}" for a in alphas)
        lines += ["", f"| k | verify ms (k+1) | verify / decode | pass ms | {head} |"]
        lines.append("|---" * (4 + len(alphas)) + "|")
        for r in result["rows"]:
            cells = " | ".join(f"{r['computed_speedup'][str(a)]:.2f}" for a in alphas)
            lines.append(
                f"| {r['k']} | {r['verify_ms']:.2f} | {r['verify_over_decode']:.2f} | {r['pass_ms']:.2f} | {cells} |"
            )
        lines += [
            "",
            "x at a: speedup computed as (1 - a^(k+1)) / (1 - a) tokens per pass over (verify + k draft decodes) / "
            "decode, for a per-token acceptance a (independent acceptances, Leviathan et al. 2023).",
        ]
    lines += ["", f"Peak RSS {result['peak_rss_mb']:.0f} MB. Machine: {result['env'].get('cpu', '')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    allow_shared_pool()  # this script's process is ours, as the cpm command's is (model and draft share one pool)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    for name in ("pair", "cost", "numerics"):
        p = sub.add_parser(name)
        p.add_argument("--target", type=Path, required=True)
        if name != "numerics":
            p.add_argument("--draft", required=True, help="a model directory, or ngram (pair only)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", type=Path, required=True)
    p = sub.choices["pair"]
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-chars", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--text", type=Path, default=DEMO_TEXT)
    p = sub.choices["cost"]
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--k", default="1,2,3,4,6,8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--acceptance", default="0.6,0.7,0.8,0.9", help="acceptance rates to compute the speedup at")
    p.add_argument("--pair-json", type=Path, default=None, help="take the acceptance from a pair run's result.json")
    p.add_argument("--pair-sampling", default="greedy")
    p = sub.choices["numerics"]
    p.add_argument("--pasts", default="40,64,100,128,150")
    p.add_argument("--k", default="2,3,4,5,6,8,9")
    p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = {"pair": pair, "cost": cost, "numerics": numerics}[args.kind](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["env"] = environment({"threads": args.threads})
    command = "python benchmarks/speculative.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / "result.md").write_text(markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
