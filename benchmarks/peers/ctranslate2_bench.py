"""CTranslate2 (float32, int8) side by side with our backends, same weights, same run, same harness.

    pip install 'cpm-infer[peers]'       # ctranslate2
    python benchmarks/peers/ctranslate2_bench.py --work-dir /tmp/peers [--threads 2] [--batch 1,8] [--repeats 3]

Runners, all on one CPM-small-shape random checkpoint (``cpm_infer.bench.setup.parity_model``, the one
``benchmarks/ort_vs_eager.py`` uses, reused from --work-dir; ``--checkpoint DIR`` for another): ``torch``
(our loop over eager PyTorch, the baseline of the ratios), ``ort`` (float32 artifact with ORT fusions),
``ort-int8`` / ``ort-int4`` (``cpm export onnx --quantize``, see --quantize), and ``ct2-float32`` /
``ct2-int8`` (the same weights converted with CTranslate2's own GPT-2 loader). Batch sizes from --batch,
16-token random prompt ids, greedy, EOS ignored, ``cpm_infer.bench.harness`` timing (one warm-up, medians).
CTranslate2's per-step times come from its step callback (the time at which row 0's token of each step is
reported). Writes ``benchmarks/results/peers-<machine>/bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from cpm_infer.bench.report import machine_slug
from cpm_infer.bench.runners import Timing
from cpm_infer.deps import require
from cpm_infer.errors import CpmError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VOCAB = ROOT.parent / "shared" / "cpm-vocab" / "chinese_vocab.model"


class CT2Runner:
    """A CTranslate2 Generator behind the harness's Runner protocol (prompt ids in, Timing out)."""

    def __init__(self, name: str, model_dir: Path, compute_type: str, pieces: list[str], threads: int) -> None:
        ctranslate2 = require("ctranslate2", "peers")

        self.name, self.pieces = name, pieces
        self.generator = ctranslate2.Generator(
            str(model_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
        )

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        tokens = [[self.pieces[i] for i in row] for row in prompts.tolist()]
        stamps: list[float] = []

        def on_step(step) -> bool:
            if step.batch_id == 0:
                stamps.append(time.perf_counter())
            return False  # keep going

        start = time.perf_counter()
        results = self.generator.generate_batch(
            tokens,
            max_length=new_tokens,
            min_length=new_tokens,
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
            callback=on_step,
        )
        produced = sum(len(r.sequences_ids[0]) for r in results)
        return Timing(stamps[0] - start, list(np.diff(stamps)), produced)


def vocabulary(tok, size: int) -> list[str]:
    """The tokenizer's pieces by id, padded with placeholders up to the model's vocab size."""
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    return pieces + [f"<unused_{i}>" for i in range(len(pieces), size)]


def convert_ct2(checkpoint: Path, out: Path, quantization: str, pieces: list[str]) -> Path:
    """CTranslate2's GPT-2 loader on our checkpoint, with the CPM SentencePiece pieces as its vocabulary
    (its converter looks for a Hugging Face tokenizer, which a CPM checkpoint does not ship)."""
    if (out / "model.bin").is_file():
        return out
    from ctranslate2.converters.transformers import GPT2Loader

    from cpm_infer.torch_model import load_model

    model, tok = load_model(checkpoint)
    spec = GPT2Loader().get_model_spec(model)
    spec.register_vocabulary(pieces)
    spec.config.bos_token = spec.config.eos_token = tok.id_to_piece(tok.eod_id)
    spec.config.unk_token = tok.id_to_piece(tok.unk_id)
    spec.validate()
    spec.optimize(quantization=quantization)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="Checkpoint, artifacts and CT2 models (reused).")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="CPM SentencePiece file.")
    parser.add_argument("--checkpoint", type=Path, help="Benchmark this checkpoint instead of a random CPM-small.")
    parser.add_argument("--quantize", default="int8,int4", help="Quantized ORT artifacts to add ('' = none).")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", default="1,8", help="Comma-separated batch sizes.")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", default=machine_slug())
    parser.add_argument("--out-dir", type=Path, default=None, help="Default: benchmarks/results/peers-<machine>.")
    args = parser.parse_args()
    ctranslate2 = require("ctranslate2", "peers")

    import torch

    from cpm_infer.backends.ort_backend import load as load_ort
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.bench import harness, report
    from cpm_infer.bench.runners import LoopRunner
    from cpm_infer.bench.setup import ensure_artifact, parity_model
    from cpm_infer.torch_model import load_model
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        ckpt, art = args.checkpoint, ensure_artifact(args.checkpoint, work / "onnx", say=log)
    else:
        ckpt, art = parity_model(work, args.vocab, say=log)
    artifacts = {"ort": art}
    for scheme in [s.strip() for s in args.quantize.split(",") if s.strip()]:
        path = art.with_name(f"{art.name}-{scheme}")
        if not (path / "manifest.json").is_file():
            log(f"quantizing {art} to {scheme} (with its quality gate)")
            export_onnx(art, path, quantize=QuantizeOptions(scheme), threads=args.threads, progress=log)
        artifacts[f"ort-{scheme}"] = path
    model, tok = load_model(ckpt)
    pieces = vocabulary(tok, model.config.vocab_size)
    runners = [LoopRunner("torch", TorchBackend(model))]
    for name, path in artifacts.items():
        runners.append(LoopRunner(name, load_ort(path, threads=args.threads)[0]))
    for quantization in ("float32", "int8"):
        log(f"converting to CTranslate2 {quantization}")
        target = convert_ct2(ckpt, work / f"ct2-{quantization}", quantization, pieces)
        runners.append(CT2Runner(f"ct2-{quantization}", target, quantization, pieces, args.threads))

    spec = model.config
    load_before = os.getloadavg()
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        case = harness.Case(batch, args.prompt_len, args.new_tokens, "base" if batch == 1 else "batch")
        prompts = harness.make_prompts(case, spec.vocab_size)
        for runner in runners:
            log(f"{runner.name}: batch {batch}")
            results.append(harness.measure(runner, case, prompts, repeats=args.repeats))
            log(f"  decode p50 {results[-1].decode_p50_ms:.2f} ms/step, {results[-1].tokens_per_s:.1f} tokens/s")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    env = report.environment(
        {
            "threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "source": str(args.checkpoint) if args.checkpoint else "CPM-small shape, random weights (parity_model)",
            "ctranslate2": ctranslate2.__version__,
        }
    )
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"peers-{args.machine}"
    written = report.write_reports(results, out, command=command, env=env, skipped={})
    print((out / "bench.md").read_text(encoding="utf-8"))
    log("wrote " + ", ".join(str(p) for p in written["files"]))


if __name__ == "__main__":
    try:
        main()
    except CpmError as exc:
        raise SystemExit(f"error: {exc}") from exc
