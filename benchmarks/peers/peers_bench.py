"""cpm-infer vs llama.cpp vs CTranslate2 on the CPU: speed (batch 1, long context, batch 8) and quality, one run.

    pip install 'cpm-infer[peers]'    # ctranslate2; llama-cpp-python only for llama.cpp's quality rows
    python benchmarks/peers/llamacpp_native.py build    # llama.cpp's own tools, from the pinned sdist (cached)
    flock -x /tmp/cpm-heavy.lock python benchmarks/peers/peers_bench.py --work-dir /tmp/peers
    # another shape: its checkpoint (llama.cpp's GGUF files are made from it) and our artifacts of it
    python benchmarks/peers/peers_bench.py --work-dir /tmp/peers-large --checkpoint LARGE_CKPT --name cpm-large \
        --artifact ours-int4=LARGE_INT4 --llama-formats q4_K_M --cases b1,pf128 --skip-quality

Speed (CPM-small shape, random weights; ``benchmarks/ort_vs_eager.py``'s checkpoint, reused from --work-dir).
Every engine runs the same weights: ours = the ``--optimize`` ONNX artifact (fp32) and its ``--quantize
int8|int4`` versions on onnxruntime, timed through our Python generation loop (what ``cpm generate`` runs);
llama.cpp = as its users run it (``llamacpp_native.py``): a GGUF from llama.cpp's own ``convert_hf_to_gguf.py``
(f32) and ``llama-quantize``'s q8_0 / q4_0 / q4_K_M of it, timed by ``llama-bench`` (batch 1) and
``llama-batched-bench`` (batch 8) on llama.cpp's own clock; CTranslate2 = its GPT-2 converter (float32). Greedy
(llama.cpp's tools decode random tokens: the same work per step), EOS ignored, random prompt ids, --threads
threads each. Cases:

- ``b1``: batch 1, 16-token prompt, 33 new tokens; decode ms/token = (t(33) - t(1)) / 32 (llama.cpp:
  ``llama-bench -p 0 -n 32 -d 16``, 32 decode steps at past 16-47).
- ``ctx900``: the same after a 900-token prompt (decode at past ~900; llama.cpp: ``-d 900``).
- ``b8``: batch 8, 16-token prompts; decode tokens/s of the batch = 8 x 32 / (t(33) - t(1)) (llama.cpp:
  ``llama-batched-bench -npp 16 -ntg 32 -npl 8``).
- ``pf128``: batch 1, the prefill of a 128-token prompt: ours = the time to the first token of ``generate``
  (prompt pass, first token chosen, our Python loop included) on a prompt new to every engine in each round (a
  repeated one would come from our prefix cache); llama.cpp: ``llama-bench -p 128 -n 0`` (pp128).

Rounds are interleaved (every engine and case once per round, after a warm-up), medians over --rounds, speed
targets as medians of per-round ratios. In every round each of llama.cpp's timed tests follows its own warm-up pass
(``llama-bench``'s default: a prompt pass of the test's size before pp128, one generated token before tg), with the
weights back in the caches after the other engines ran; ours gets the same: an untimed call of the same case (another
random prompt of the same shape) right before each timed one.

Why llama.cpp's numbers moved (against results before this change): llama.cpp used to be timed through
llama-cpp-python, one ``llama_decode`` per step from a Python loop that copied each row's logits to numpy for an
argmax, on a GGUF written by our own writer (``llama_cpp_peer.write_gguf``, an ``output.weight`` copy of the
embedding beside it) and quantized through the binding. Users run llama.cpp's converter, quantizer and native
binaries: no Python per token, and a GGUF whose LM head is the tied embedding, which ``llama-quantize`` keeps at
q6_K in the q4 files. That is what is timed now; ours is still timed through our Python loop, which is what our
users run. The binding path is kept for quality only (``llama_cpp_peer.LlamaCppRunner``: full logits).

Quality (``cpm_infer/demo/sanguo``: the demo model and its held-out chapter). Reference: float32 eager
PyTorch. Per engine, over non-overlapping 256-token windows of the chapter (teacher forcing, every
position): mean KL(reference || engine) of the next-token distribution, top-1 agreement with the
reference, perplexity; and free-running greedy agreement: 4 prompts of 16 tokens, 240 new tokens each
(256 in all), the share of new tokens equal to the reference's before the first difference. llama.cpp's rows
read logits through the llama-cpp-python binding, on the GGUF files of llama.cpp's own converter and quantizer;
without the binding they are left out (said on stderr), unless ``--binding-from-build`` loads the binding's
Python code from the pinned sdist over the ``libllama`` built by ``llamacpp_native.py`` (no second build).

Writes ``benchmarks/results/peers-llamacpp-<machine>/{results.json,README.md}``: ours vs llama.cpp vs
CTranslate2, ratios from this run, each target with pass/fail.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The sibling modules import as top-level ones: the script's folder is first on sys.path when it runs.
from compute_bound import batch_bound, flops_per_token, kernel_throughput
from ctranslate2_bench import DEFAULT_VOCAB, CT2Runner, convert_ct2, vocabulary
from llama_cpp_peer import LlamaCppRunner
from llamacpp_native import NativeRunner, Tools, build, build_info, convert_all, find_tools, use_binding_from_build

from cpm_infer.bench.report import machine_slug
from cpm_infer.bench.runners import LoopRunner

ROOT = Path(__file__).resolve().parents[2]

# Variants measured next to the defaults (export.quantize.CONFIGS), name -> (scheme, overrides): int8 per
# channel (faster, further from float32), the former int8 default (symmetric round-to-nearest blocks of 32, the head
# as the body) and other blocks; int4 with smaller blocks and an 8-bit or float32 LM head, which trade bytes read per
# token for quality.
_INT8_RTN = {"symmetric": True, "algorithm": "rtn", "lm_head_block_size": None}
VARIANTS = {
    "ours-int4-fast": ("int4", {"recipe": "fast"}),  # --quantize int4 --fast: the 4-bit head and embedding
    "ours-int8-per-channel": ("int8", {**_INT8_RTN, "block_size": None}),
    "ours-int8-b32": ("int8", {**_INT8_RTN, "block_size": 32}),  # the int8 default before k-quant blocks of 64
    "ours-int8-b64": ("int8", {**_INT8_RTN, "block_size": 64}),
    "ours-int8-b128": ("int8", {**_INT8_RTN, "block_size": 128}),
    "ours-int8-b64-kq": ("int8", {"block_size": 64, "lm_head_block_size": None}),  # the head k-quant too
    "ours-int8-b128-kq": ("int8", {"block_size": 128, "lm_head_block_size": None}),
    "ours-int4-b32": ("int4", {"block_size": 32}),
    "ours-int4-b32-int8head": ("int4", {"block_size": 32, "lm_head": "int8"}),
    "ours-int4-b32-f32head": ("int4", {"block_size": 32, "lm_head": "float32"}),
}
CASES = {"b1": (1, 16), "ctx900": (1, 900), "b8": (8, 16), "pf128": (1, 128)}  # name -> (batch, prompt length)
PREFILL_CASES = {"pf128"}  # timed to the first token; the others per decode step
NEW = 33
LLAMA_FORMATS = ("f32", "q8_0", "q4_0", "q4_K_M")  # llama-quantize types beside the converter's f32
WINDOW, PROMPT, FREE = 256, 16, 240


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_details() -> dict:
    """CPU family/model/flags of interest, clock, caches and memory, from /proc and sysconf."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info = {
            "family": fields.get("cpu family"),
            "model": fields.get("model"),
            "mhz": fields.get("cpu MHz"),
            "cache_size": fields.get("cache size"),
            "simd": sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni"}),
        }
    except OSError:
        pass
    info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return info


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 7) -> float:
    """Memory bandwidth (GB/s) with ``threads`` threads, STREAM-copy style: each thread copies its own slice
    of a buffer far larger than the caches (numpy releases the GIL while copying); bytes read + written over
    the best time."""
    from concurrent.futures import ThreadPoolExecutor

    n = mib * 2**20 // 4
    src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: np.copyto(dst[part], src[part]), slices))
            best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best / 1e9


def quantized_artifact(fp32: Path, out: Path, scheme: str, overrides: dict | None = None) -> Path:
    """``fp32`` (an --optimize artifact) quantized with ``export.quantize``'s quantizer and the scheme's settings
    (plus ``overrides``), reused when it exists. The quality gate of ``cpm export onnx --quantize`` is not run:
    the quality section below measures every artifact against float32 itself."""
    import shutil

    from cpm_infer.artifact import read_manifest, write_manifest
    from export.quantize import config_for
    from export.quantize_graph import quantize_graph

    config = config_for(scheme, **(overrides or {}))
    if is_current(out, config):
        return out
    shutil.rmtree(out, ignore_errors=True)  # absent, or written with other settings (an older default)
    manifest = read_manifest(fp32)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fp32 / manifest.tokenizer_file, out / manifest.tokenizer_file)
    graph = f"model_{scheme}.onnx"  # its weights: model_{scheme}.onnx.data beside it
    info = quantize_graph(fp32 / manifest.graph_files["model"], out / graph, manifest.spec, config)
    manifest.graph_files = {"model": graph}
    manifest.details = {**manifest.details, "quantization": {**config.to_dict(), **info, "overrides": overrides or {}}}
    write_manifest(out, manifest)
    return out


def is_current(artifact: Path, config) -> bool:
    """``artifact`` exists and was quantized with ``config`` from a graph of this code's exporter (a work dir may hold
    an older default's, or an older graph's)."""
    from cpm_infer.artifact import read_manifest
    from export.onnx_export import current_graph

    if not (artifact / "manifest.json").is_file():
        return False
    details = read_manifest(artifact).details
    written = details.get("quantization")
    return (
        isinstance(written, dict)
        and current_graph(details)
        and all(written.get(key) == value for key, value in config.to_dict().items())
    )


# -- speed -----------------------------------------------------------------------------------------


def native_ggufs(
    tools: Tools, checkpoint: Path, work: Path, name: str, threads: int, formats: Sequence[str] = LLAMA_FORMATS
) -> dict:
    """``llama-<format>`` -> GGUF from llama.cpp's converter and quantizer (reused; a folder per version, so files
    written by our own writer in older work dirs are never picked up)."""
    files = convert_all(checkpoint, work / f"llama.cpp-{tools.version}", name, tools, threads, formats)
    return {f"llama-{fmt}": path for fmt, path in files.items()}


def speed_engines(
    work: Path,
    vocab: Path,
    threads: int,
    tools: Tools,
    llama_reps: int = 1,
    *,
    wanted: set[str] | None = None,
    checkpoint: Path | None = None,
    artifacts: dict[str, Path] | None = None,
    name: str = "cpm-small",
    formats: Sequence[str] = LLAMA_FORMATS,
) -> dict:
    """name -> runner, every engine on the same weights (llama.cpp: ``NativeRunner``, its tools); ``wanted``: only
    those engines are built and loaded. By default the random CPM-small of ``parity_model`` with our artifacts made
    from it; with ``checkpoint``, that model's GGUF files (named ``name``) and ``artifacts`` as ours (made
    beforehand with ``cpm export onnx``: a CPM-large export takes many minutes)."""
    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.bench.setup import parity_model
    from cpm_infer.torch_model import load_model

    def want(engine: str) -> bool:
        return wanted is None or engine in wanted

    if checkpoint is None:
        ckpt, art = parity_model(work, vocab, say=say)
        ours = {"ours-fp32": art}
        for scheme in ("int8", "int4"):
            ours[f"ours-{scheme}"] = quantized_artifact(art, work / f"{name}-{scheme}", scheme)
        for variant, (scheme, overrides) in VARIANTS.items():
            if want(variant):
                ours[variant] = quantized_artifact(art, work / f"{name}-{variant}", scheme, overrides)
    else:
        ckpt, ours = checkpoint, dict(artifacts or {})
    formats = [f for f in formats if want(f"llama-{f}")]
    gguf = native_ggufs(tools, ckpt, work, name, threads, formats) if formats else {}
    engines = {e: LoopRunner(e, load_ort(path, threads=threads)[0]) for e, path in ours.items() if want(e)}
    for engine, path in gguf.items():
        engines[engine] = NativeRunner(engine, tools, path, threads=threads, reps=llama_reps)
    if want("ct2-f32"):
        model, tok = load_model(ckpt)
        pieces = vocabulary(tok, model.config.vocab_size)
        ct2 = convert_ct2(ckpt, work / "ct2-float32", "float32", pieces)
        del model
        engines["ct2-f32"] = CT2Runner("ct2-f32", ct2, "float32", pieces, threads)
    return engines


def time_speed(engines: dict, rounds: int, vocab: int, cases: Sequence[str] = tuple(CASES)) -> dict:
    """{engine: {case: [decode seconds per step, one per round]}}, rounds interleaved. llama.cpp's tools
    (``NativeRunner``) warm up inside each call and report their own clock; the others run our harness."""
    rng = np.random.default_rng(0)
    chosen = {c: CASES[c] for c in cases}
    prompts = {c: rng.integers(10, vocab, size=(b, p), dtype=np.int64) for c, (b, p) in chosen.items()}
    for name, runner in engines.items():
        say(f"warm-up {name}")
        for case, (batch, prompt_len) in chosen.items():
            if isinstance(runner, NativeRunner):
                if case not in PREFILL_CASES:  # fails early if a tool cannot run the file
                    runner.step_seconds(batch, prompt_len, 4)
            else:
                runner.run(prompts[case], 4)
    times: dict = {name: {case: [] for case in chosen} for name in engines}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for case, (batch, prompt_len) in chosen.items():
            if case in PREFILL_CASES:  # a prompt no engine has seen: our prefix cache would serve a repeated one
                prompts[case] = rng.integers(10, vocab, size=(batch, prompt_len), dtype=np.int64)
            for name, runner in engines.items():
                if not isinstance(runner, NativeRunner):  # the warm-up pass llama-bench makes before each test
                    runner.run(rng.integers(10, vocab, size=(batch, prompt_len), dtype=np.int64), 2)
                times[name][case].append(_case_seconds(runner, case, prompts[case]))
    return times


def _case_seconds(runner, case: str, prompts: np.ndarray) -> float:
    """Seconds per decode step of ``case`` (prefill cases: seconds to the first token)."""
    batch, prompt_len = prompts.shape
    if isinstance(runner, NativeRunner):
        if case in PREFILL_CASES:
            return runner.prefill_seconds(prompt_len)
        return runner.step_seconds(batch, prompt_len, NEW - 1)
    if case in PREFILL_CASES:
        return runner.run(prompts, 1).first_token_s
    timing = runner.run(prompts, NEW)
    return sum(timing.step_s) / len(timing.step_s)


def summarize_speed(times: dict) -> dict:
    rows = {}
    for name, cases in times.items():
        b1, ctx, b8, pf = (statistics.median(cases[c]) if cases.get(c) else None for c in CASES)
        rows[name] = {
            "decode_ms": b1 * 1e3,
            "prefill128_ms": pf * 1e3 if pf else None,
            "decode_ms_past900": ctx * 1e3 if ctx else None,
            "past900_over_past16": ctx / b1 if ctx else None,
            "b8_step_ms": b8 * 1e3 if b8 else None,
            "b1_tokens_per_s": 1 / b1,
            "b8_tokens_per_s": 8 / b8 if b8 else None,
            "b8_over_b1_tokens_per_s": 8 * b1 / b8 if b8 else None,
            "rounds_ms": {c: [round(t * 1e3, 3) for t in v] for c, v in cases.items()},
        }
    return rows


# -- quality ---------------------------------------------------------------------------------------


def quality_files(work: Path, threads: int, tools: Tools) -> tuple[dict, dict]:
    """The demo model's ONNX artifacts (fp32, int8, int4 and the int4 variants) and GGUF files from llama.cpp's
    converter and quantizer (reused)."""
    from cpm_infer.bench.setup import ensure_artifact
    from cpm_infer.demo import demo_model_dir
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    demo = demo_model_dir()
    art = ensure_artifact(demo, work / "demo-fp32", say=say)
    ours = {"ours-fp32": art}
    for scheme in ("int8", "int4"):
        path = work / f"demo-{scheme}"
        if not is_current(path, QuantizeOptions(scheme).config()):  # the export runs the quality gate too
            export_onnx(art, path, quantize=QuantizeOptions(scheme), force=True, threads=threads, progress=say)
        ours[f"ours-{scheme}"] = path
    for name, (scheme, overrides) in VARIANTS.items():
        ours[name] = quantized_artifact(art, work / f"demo-{name}", scheme, overrides)
    return ours, native_ggufs(tools, demo, work, "demo", threads)


def binding_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        say(f"llama-cpp-python is not usable ({exc}): llama.cpp's quality rows are left out")
        return False
    return True


def quality(work: Path, threads: int, tools: Tools, *, llama: bool, only: set[str] | None = None) -> dict:
    """KL / top-1 / perplexity / greedy agreement of every engine against float32 eager on the demo model
    (llama.cpp's GGUF files: only with ``llama``, which needs the llama-cpp-python binding for logits)."""
    import torch

    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.bench.runners import IdsTokenizer
    from cpm_infer.config import GenerationConfig
    from cpm_infer.demo import demo_model_dir
    from cpm_infer.engine.generate import generate
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import load_model

    torch.set_num_threads(threads)
    demo = demo_model_dir()
    tok = CpmTokenizer(demo / "spiece.model")
    ids = np.array(tok.encode((demo / "heldout.txt").read_text(encoding="utf-8")), dtype=np.int64)
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    prompts = np.stack([w[:PROMPT] for w in windows[:4]])
    model, _ = load_model(demo)
    reference = TorchBackend(model)
    ours, gguf = quality_files(work, threads, tools)
    if not llama:
        gguf = {}
    if only is not None:  # --engines
        ours = {name: path for name, path in ours.items() if name in only}
        gguf = {name: path for name, path in gguf.items() if name in only}

    def window_logits(fn) -> list[np.ndarray]:
        return [np.asarray(fn(w), dtype=np.float32) for w in windows]

    def backend_logits(backend):
        def fn(w):
            x = w[None, :]
            return backend.logits_all(x, np.ones_like(x), np.arange(len(w))[None, :])[0]

        return fn

    config = GenerationConfig(temperature=0, max_new_tokens=FREE, ignore_eos=True, ban_unk=False)

    def backend_greedy(backend) -> np.ndarray:
        results = generate(backend, prompts.tolist(), config, IdsTokenizer(backend.spec.vocab_size))
        return np.array([r.token_ids for r in results])

    say("quality: float32 eager reference")
    ref_logits = window_logits(backend_logits(reference))
    ref_greedy = backend_greedy(reference)
    engines = {name: load_ort(path, threads=threads)[0] for name, path in ours.items()}
    out = {}
    for name, backend in engines.items():
        say(f"quality: {name}")
        out[name] = compare(
            ref_logits, window_logits(backend_logits(backend)), windows, ref_greedy, backend_greedy(backend)
        )
    for name, path in gguf.items():
        say(f"quality: {name}")
        runner = LlamaCppRunner(name, path, threads=threads, n_ctx=WINDOW)
        runner.run(prompts, FREE)
        greedy = runner.last_tokens
        out[name] = compare(ref_logits, window_logits(runner.logits_all), windows, ref_greedy, greedy)
        runner.close()
    out["_setup"] = {
        "model": "cpm_infer/demo/sanguo (4 layers, 256 hidden, vocab 8000)",
        "text": "heldout.txt (chapter 60)",
        "windows": len(windows),
        "window": WINDOW,
        "positions": len(windows) * (WINDOW - 1),
        "greedy": f"{len(prompts)} prompts x {PROMPT} tokens, {FREE} new tokens",
        "reference_ppl": float(np.exp(np.mean([nll(lg, w) for lg, w in zip(ref_logits, windows, strict=True)]))),
    }
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Mean negative log-likelihood of window[1:] given the logits of window[:-1]."""
    lp = log_softmax(logits[:-1])
    return float(-lp[np.arange(len(window) - 1), window[1:]].mean())


def compare(ref: list, got: list, windows: list, ref_greedy: np.ndarray, greedy: np.ndarray) -> dict:
    kls, top1, nlls = [], [], []
    for r, g, w in zip(ref, got, windows, strict=True):
        lp, lq = log_softmax(r[:-1]), log_softmax(g[:-1])
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        top1.append(r[:-1].argmax(-1) == g[:-1].argmax(-1))
        nlls.append(nll(g, w))
    same = greedy == ref_greedy
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return {
        "kl_mean": float(np.concatenate(kls).mean()),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "ppl": float(np.exp(np.mean(nlls))),
        "greedy_prefix_agreement": float(np.mean(prefix) / greedy.shape[1]),
        "greedy_positionwise_agreement": float(same.mean()),
    }


# -- report ----------------------------------------------------------------------------------------


def paired(speed: dict, a: str, b: str | list[str], case_a: str = "b1", case_b: str = "b1") -> float:
    """Median over rounds of a's time / b's time in the same round (b: the faster of several engines in that
    round). Rounds are interleaved, so a slow spell of a shared machine hits both sides of each ratio; the
    ratio of the two medians can pair a quiet round of one engine with a noisy round of the other."""
    others = [b] if isinstance(b, str) else b
    mine = speed[a]["rounds_ms"][case_a]
    theirs = [min(v) for v in zip(*(speed[o]["rounds_ms"][case_b] for o in others), strict=True)]
    return statistics.median(x / y for x, y in zip(mine, theirs, strict=True))


def targets(speed: dict, qual: dict | None) -> list[dict]:
    """Each speed and quality target with its value from this run: speed ratios are paired per round (``paired``),
    with the ratio of the medians beside them."""
    s = speed
    out = []

    def timed(case: str, *engines: str) -> bool:
        return all(s[e]["rounds_ms"].get(case) for e in engines)

    def check(item: str, what: str, value: float, limit: float, op: str = "<=", medians: float | None = None) -> None:
        ok = value <= limit if op == "<=" else value >= limit
        row = {"item": item, "target": what, "value": round(value, 3), "limit": limit, "met": bool(ok)}
        out.append(row | ({"ratio_of_medians": round(medians, 3)} if medians is not None else {}))

    # Every int8 / int4 artifact of the run against its peer (the defaults first), so that the speed and the
    # quality of each recipe can be read side by side; the limits are the (ours <= 0.85x llama.cpp's
    # decode time at its quality, fp32 <= 0.9x, prefill <= 0.8x at the same precision, int8 batch 8 >= 1.2x).
    peers = (("int4", "llama-q4_K_M", 0.85), ("int4", "llama-q4_0", 0.85), ("int8", "llama-q8_0", 0.85))
    pairs = [
        (ours, theirs, limit)
        for scheme, theirs, limit in peers
        for ours in sorted((n for n in s if n.startswith(f"ours-{scheme}")), key=len)
        if theirs in s
    ]
    for ours, theirs, limit in pairs:
        medians = s[ours]["decode_ms"] / s[theirs]["decode_ms"]
        check("decode", f"{ours} decode / {theirs}", paired(s, ours, theirs), limit, medians=medians)
    same_precision = (("ours-fp32", "llama-f32"), ("ours-int8", "llama-q8_0"), ("ours-int4", "llama-q4_K_M"))
    present = [(a, b) for a, b in same_precision if a in s and b in s]
    if ("ours-fp32", "llama-f32") in present:
        medians = s["ours-fp32"]["decode_ms"] / s["llama-f32"]["decode_ms"]
        check("decode", "ours-fp32 decode / llama-f32", paired(s, "ours-fp32", "llama-f32"), 0.9, medians=medians)
    if ("ours-int8", "llama-q8_0") in present and timed("b8", "ours-int8", "llama-q8_0"):
        value = paired(s, "llama-q8_0", "ours-int8", "b8", "b8")  # their step time / ours = our tokens/s / theirs
        medians = s["ours-int8"]["b8_tokens_per_s"] / s["llama-q8_0"]["b8_tokens_per_s"]
        check("batch 8", "ours-int8 batch-8 tokens/s / llama-q8_0", value, 1.2, ">=", medians)
    for ours, theirs in [(a, b) for a, b in present if timed("pf128", a, b)]:
        medians = s[ours]["prefill128_ms"] / s[theirs]["prefill128_ms"]
        value = paired(s, ours, theirs, "pf128", "pf128")
        check("prefill", f"{ours} prefill 128 / {theirs}", value, 0.8, medians=medians)
    if qual:
        for ours, theirs, _ in [p for p in pairs if p[1] in qual]:
            check("quality", f"{ours} KL / {theirs} KL", qual[ours]["kl_mean"] / qual[theirs]["kl_mean"], 1.0)
            check(
                "quality",
                f"{ours} greedy agreement - {theirs}",
                qual[ours]["greedy_prefix_agreement"] - qual[theirs]["greedy_prefix_agreement"],
                0.0,
                ">=",
            )
    return out


def shape_label(checkpoint: Path | None, name: str) -> str:
    if checkpoint is None:
        return "CPM-small shape"
    config = json.loads((checkpoint / "config.json").read_text())
    return f"{name} ({config['n_layer']} layers x {config['n_embd']}, vocab {config['vocab_size']})"


def bound_report(speed: dict, kernels: dict) -> dict:
    """The most int4 batch-8 / batch-1 tokens/s that arithmetic allows on this CPU (any kernel, any format)."""
    flops = flops_per_token(12, 768, 30000)
    peak = max(v for rows in kernels.values() for v in rows.values())
    t1 = speed["ours-int4"]["decode_ms"] / 1e3
    return {
        "flops_per_token": flops,
        "kernel_gflops": {name: {str(r): round(v, 1) for r, v in rows.items()} for name, rows in kernels.items()},
        "peak_gflops": peak,
        "int4_b8_step_ms_at_peak": 8 * flops / (peak * 1e9) * 1e3,
        "int4_b8_over_b1_bound": batch_bound(t1, 8, flops, peak),
    }


def markdown(report: dict) -> str:
    s, env = report["speed"], report["environment"]
    lines = [
        "# cpm-infer vs llama.cpp vs CTranslate2 (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads per engine; measured read "
        f"bandwidth {env['read_gb_per_s']:.1f} GB/s (copy of 512 MiB, {env['threads']} threads, read + write); "
        f"load average {env['loadavg_before'][0]:.2f} before, {env['loadavg_after'][0]:.2f} after; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        f"Speed: {report.get('shape', 'CPM-small shape')}, same random weights for every engine, greedy, median of "
        f"{env['rounds']} "
        "interleaved rounds. Decode ms/token = (t(33) - t(1)) / 32 after a 16-token prompt (past 16) or a "
        "900-token prompt (past 900); batch 8 = tokens/s of the whole batch over the same 32 steps; prefill 128 = "
        "time to the first token of a 128-token prompt (llama.cpp: pp128 of llama-bench). llama.cpp: "
        f"its own tools ({env.get('llama_cpp', {}).get('tools', 'llama-bench, llama-batched-bench')}) on GGUF "
        "files from its own converter and quantizer; ours and CTranslate2: our Python generation loop.",
        "",
        "| engine | decode ms/token | past 900 ms | past 900 / past 16 | batch 8 tok/s | batch 8 / batch 1 "
        "| prefill 128 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: float | None, form: str, unit: str = "") -> str:
        return "-" if value is None else format(value, form) + unit

    for name, r in s.items():
        lines.append(
            f"| {name} | {r['decode_ms']:.2f} | {cell(r['decode_ms_past900'], '.2f')} | "
            f"{cell(r['past900_over_past16'], '.2f', 'x')} | {cell(r['b8_tokens_per_s'], '.0f')} | "
            f"{cell(r['b8_over_b1_tokens_per_s'], '.2f', 'x')} | {cell(r['prefill128_ms'], '.1f')} |"
        )
    q = report.get("quality")
    if q:
        setup = q["_setup"]
        lines += [
            "",
            f"Quality: {setup['model']}, {setup['text']}; reference float32 eager PyTorch (perplexity "
            f"{setup['reference_ppl']:.2f}); {setup['windows']} windows of {setup['window']} tokens, teacher forcing "
            f"at every position ({setup['positions']} predictions); greedy: {setup['greedy']}. llama.cpp's "
            f"logits: {setup.get('llama', 'llama-cpp-python')}.",
            "",
            "| engine | mean KL | top-1 agreement | perplexity | greedy agreement (prefix) | greedy (position-wise) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in q.items():
            if name.startswith("_"):
                continue
            lines.append(
                f"| {name} | {r['kl_mean']:.5f} | {r['top1_agreement']:.4f} | {r['ppl']:.2f} | "
                f"{r['greedy_prefix_agreement']:.3f} | {r['greedy_positionwise_agreement']:.3f} |"
            )
    lines += [
        "",
        "Targets, from this run:",
        "",
        "| item | target | value (speed: median of per-round ratios) | ratio of medians | limit | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for t in report["targets"]:
        op = ">=" if "tokens/s" in t["target"] or "agreement" in t["target"] else "<="
        medians = t.get("ratio_of_medians", "")
        lines.append(
            f"| {t['item']} | {t['target']} | {t['value']} | {medians} | {op} {t['limit']} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="Checkpoints, artifacts, GGUF files (reused).")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="CPM SentencePiece file.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--llama-reps", type=int, default=1, help="llama-bench -r per round (default 1).")
    parser.add_argument(
        "--build-llama", action="store_true", help="Build llama.cpp's tools when absent (many minutes, cached)."
    )
    parser.add_argument(
        "--binding-from-build",
        action="store_true",
        help="Quality: load llama-cpp-python's Python code from the pinned sdist over the libllama built here.",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="Write every checkpoint, artifact and GGUF file, time nothing."
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="Time this checkpoint's shape (e.g. a random CPM-large) instead of a random CPM-small; with --artifact.",
    )
    parser.add_argument(
        "--artifact", action="append", default=[], metavar="NAME=DIR", help="With --checkpoint: ours-int4=DIR, ..."
    )
    parser.add_argument("--name", default="cpm-small", help="GGUF and artifact file prefix in --work-dir.")
    parser.add_argument("--cases", default=",".join(CASES), help=f"Subset of {', '.join(CASES)} (b1 always).")
    parser.add_argument("--llama-formats", default=",".join(LLAMA_FORMATS))
    parser.add_argument(
        "--engines", default=None, help="Comma-separated engines to time (default: all), e.g. ours-int4,llama-q4_K_M."
    )
    parser.add_argument("--machine", default=machine_slug())
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="Default: benchmarks/results/peers-llamacpp-<machine>."
    )
    args = parser.parse_args()
    try:
        import ctranslate2
    except ImportError as exc:
        raise SystemExit("error: ctranslate2 is not installed (pip install 'cpm-infer[peers]')") from exc
    tools = build() if args.build_llama else find_tools()
    if tools is None:
        raise SystemExit(
            "error: llama.cpp's tools are not built: python benchmarks/peers/llamacpp_native.py build "
            "(or pass --build-llama)"
        )
    if args.binding_from_build:
        use_binding_from_build(tools)
    from cpm_infer.artifact import read_manifest
    from cpm_infer.bench import report as bench_report
    from cpm_infer.errors import CpmError
    from export.onnx_export import GRAPH_FORMAT, current_graph

    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        speed_engines(args.work_dir, args.vocab, args.threads, tools)
        quality_files(args.work_dir, args.threads, tools)
        say(f"prepared {args.work_dir}")
        return
    load_before = os.getloadavg()
    bandwidth = read_bandwidth(args.threads)
    say(f"read bandwidth {bandwidth:.1f} GB/s")
    wanted = set(args.engines.split(",")) if args.engines else None
    artifacts = {}
    for item in args.artifact:
        engine, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"error: --artifact {item}: expected NAME=DIR with an existing artifact directory")
        artifacts[engine] = Path(path)
        try:
            details = read_manifest(path).details
        except CpmError as exc:
            raise SystemExit(f"error: --artifact {item}: {exc}") from exc
        if not current_graph(details):
            written = details.get("graph_format")
            say(f"warning: {path} records graph format {written}, this checkout exports {GRAPH_FORMAT}: an older graph")
    cases = ["b1", *[c for c in args.cases.split(",") if c != "b1"]]
    if any(c not in CASES for c in cases):
        raise SystemExit(f"error: --cases takes {', '.join(CASES)}")
    engines = speed_engines(
        args.work_dir,
        args.vocab,
        args.threads,
        tools,
        args.llama_reps,
        wanted=wanted,
        checkpoint=args.checkpoint,
        artifacts=artifacts,
        name=args.name,
        formats=args.llama_formats.split(","),
    )
    unknown = sorted((wanted or set()) - set(engines))
    if unknown:
        raise SystemExit(f"error: unknown engine {unknown[0]} (have: {', '.join(engines)})")
    speed = summarize_speed(time_speed(engines, args.rounds, 30000, cases))
    llama_build = next((r.bench for r in engines.values() if isinstance(r, NativeRunner) and r.bench), {})
    bound = args.checkpoint is None and "ours-int4" in speed and speed["ours-int4"]["b8_step_ms"] is not None
    if bound:
        say("matrix-multiply kernel throughput (the batch bound)")
    kernels = kernel_throughput(args.threads) if bound else {}
    qual = None
    if not args.skip_quality:
        with_llama = binding_available()
        qual = quality(args.work_dir, args.threads, tools, llama=with_llama, only=set(engines))
        if with_llama:
            import llama_cpp

            binding = f"llama-cpp-python {llama_cpp.__version__}"
            qual["_setup"]["llama"] = binding + (" (sdist code over this build's libllama)" * args.binding_from_build)
        else:
            qual["_setup"]["llama"] = "left out: llama-cpp-python is not installed"

    env = bench_report.environment(
        {
            "threads": args.threads,
            "rounds": args.rounds,
            "read_gb_per_s": bandwidth,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cpu_details": cpu_details(),
        }
    )
    env["versions"].update({"llama.cpp": f"{tools.version} sdist, build {llama_build.get('build')}"})
    env["versions"]["ctranslate2"] = ctranslate2.__version__
    env["llama_cpp"] = build_info(tools) | {"tools": "llama-bench, llama-batched-bench", "bench": llama_build}
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": env,
        "speed": speed,
        "quality": qual,
        "batch_bound": bound_report(speed, kernels) if bound else None,
        "shape": shape_label(args.checkpoint, args.name),
        "targets": targets(speed, qual),
    }
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"peers-llamacpp-{args.machine}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "README.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    say(f"wrote {out}/results.json, README.md")


if __name__ == "__main__":
    main()
