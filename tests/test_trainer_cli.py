"""`cpm train finetune/distill` on tiny models from the CLI: outputs, exact resume, Ctrl-C, refusals."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS
from typer.testing import CliRunner

pytest.importorskip("accelerate", reason="the trainer needs the train extra (accelerate)")
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster on a shared machine, and every run of the module (the
    reference run included: module scope) uses the same reduction order, so results compare exactly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight essays in the seeds' one-file-per-document format."""
    out = tmp_path_factory.mktemp("seed")
    lines = CORPUS.strip().splitlines()
    for i in range(8):
        body = "\n\n".join(lines[i:] + lines[:i])
        (out / f"essay{i}.txt").write_text(
            f"---\n标题：第{i}篇\n日期：2021-01-0{i + 1}\n作者：某\n---\n\n{body}\n", encoding="utf-8"
        )
    return out


def cpm(*args: str, code: int = 0):
    from cpm_infer.cli.app import app

    result = runner.invoke(app, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.exception!r}")
    return result


def common(seed_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        seed_dir,
        "-o",
        out,
        "--max-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--log-every",
        "1",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--cache-dir",
        cache,
        "--val-fraction",
        "0.25",
        "--seed",
        "7",
        *extra,
    ]


def _options(command: str) -> list[tuple[str, dict]]:
    """What ``cpm train <command>`` takes: each parameter's name and what --help and parsing make of it."""
    import typer

    from cpm_infer.cli.train import app

    click_command = typer.main.get_command(app).commands[command]
    seen = ("opts", "secondary_opts", "required", "nargs", "multiple", "default", "min", "max", "help", "is_flag")
    return [
        (p.name, {key: getattr(p, key, None) for key in seen} | {"type": p.type_descriptor.annotation})
        for p in click_command.params
    ]


def test_finetune_and_distill_share_the_run_options() -> None:
    from cpm_infer.cli.train import _run_options
    from trainer.config import TrainConfig

    shared = list(inspect.signature(_run_options).parameters)
    finetune, distill = _options("finetune"), _options("distill")
    assert [o for o in finetune if o[0] in shared] == [o for o in distill if o[0] in shared]
    assert [o[0] for o in finetune if o[0] in shared] == shared
    # data and --output lead, each command's own options follow, the shared rest close the list
    assert [o[0] for o in finetune[:3]] == ["data", "output", "model"]
    assert [o[0] for o in distill[:3]] == ["data", "output", "teacher"]
    assert [o[0] for o in finetune[-len(shared) + 2 :]] == shared[2:]
    assert [o[0] for o in distill[-len(shared) + 2 :]] == shared[2:]
    # every run setting has its option, named after it
    assert sorted(shared) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    defaults = {name: info["default"] for name, info in finetune}
    assert (defaults["batch_size"], defaults["lr"], defaults["log_every"], defaults["data_format"]) == (
        8,
        1e-4,
        10,
        "auto",
    )


def test_train_help_is_instant() -> None:
    code = (
        "import sys\n"
        "from cpm_infer.cli.app import app\n"
        "for command in ('finetune', 'distill'):\n"
        "    try:\n        app(['train', command, '--help'], prog_name='cpm')\n"
        "    except SystemExit: pass\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'accelerate', 'trainer') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "--teacher" in out and "--grad-checkpointing" in out


def train_losses(run: Path) -> dict[int, float]:
    from trainer.state import read_metrics

    return {int(r["step"]): float(r["loss"]) for r in read_metrics(run / "metrics.csv") if r["split"] == "train"}


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(seed_dir: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 8 steps in one go."""
    base = tmp_path_factory.mktemp("straight")
    cpm("train", "finetune", *common(seed_dir, base / "run", base / "cache"), "-m", tiny_checkpoint)
    return base / "run"


def test_finetune_writes_servable_checkpoints(straight_run: Path) -> None:
    from cpm_infer.checkpoint import open_checkpoint

    for name in ("last", "best"):
        ckpt = open_checkpoint(straight_run / name)
        generation = json.loads((ckpt.directory / "generation_config.json").read_text())
        from cpm_infer.tokenizer import CpmTokenizer

        tok = CpmTokenizer(ckpt.tokenizer_file)
        assert generation["eos_token_id"] == tok.eod_id and generation["pad_token_id"] == tok.pad_id
    assert (straight_run / "last" / "training_state.pt").is_file()
    assert not (straight_run / "best" / "training_state.pt").exists()
    losses = train_losses(straight_run)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    state = json.loads((straight_run / "last" / "trainer_state.json").read_text())
    assert state["step"] == 8
    result = cpm("generate", "-m", straight_run / "last", "-p", "话说天下", "-n", "5", "--temperature", "0")
    assert result.output.strip()


def test_finetuned_checkpoint_exports_to_onnx(straight_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cpm("export", "onnx", straight_run / "last", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "manifest.json").is_file()


def test_resume_after_session_limit_is_exact(
    seed_dir: Path, tiny_checkpoint: Path, straight_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = common(seed_dir, run, tmp_path / "cache")
    cpm("train", "finetune", *args, "-m", tiny_checkpoint, "--stop-after-steps", "3")
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 3
    cpm("train", "finetune", *args, "-m", tiny_checkpoint, "--resume")
    assert train_losses(run) == pytest.approx(train_losses(straight_run), rel=1e-5)
    ours, reference = weights(run / "last"), weights(straight_run / "last")
    for key, tensor in reference.items():
        assert (ours[key] - tensor).abs().max() <= 1e-6, key


def test_ctrl_c_saves_a_resumable_checkpoint(
    seed_dir: Path, tiny_checkpoint: Path, straight_run: Path, tmp_path: Path
) -> None:
    from trainer.config import TrainConfig
    from trainer.errors import TrainingInterrupted
    from trainer.finetune import finetune
    from trainer.loop import Callbacks

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=[seed_dir],
        output=run,
        max_len=32,
        batch_size=4,
        max_steps=8,
        eval_every=4,
        log_every=1,
        warmup_steps=2,
        lr=3e-3,
        cache_dir=tmp_path / "cache",
        val_fraction=0.25,
        seed=7,
    )

    def press_ctrl_c(info) -> None:
        if info.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    # Ranks agree on stopping inside each step's all-reduce: a Ctrl-C after step 5's finishes step 6.
    with pytest.raises(TrainingInterrupted, match="step 6 of 8"):
        finetune(cfg, model_dir=tiny_checkpoint, callbacks=Callbacks(on_step=press_ctrl_c))
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 6
    cpm("train", "finetune", *common(seed_dir, run, tmp_path / "cache"), "-m", tiny_checkpoint, "--resume")
    assert train_losses(run) == pytest.approx(train_losses(straight_run), rel=1e-5)


def test_incompatible_or_missing_resume_is_refused(seed_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from cpm_infer.errors import CpmError

    run = tmp_path / "run"
    args = common(seed_dir, run, tmp_path / "cache")
    result = cpm("train", "finetune", *args, "-m", tiny_checkpoint, "--resume", code=1)
    assert isinstance(result.exception, CpmError) and "nothing to resume" in str(result.exception)
    cpm("train", "finetune", *args, "-m", tiny_checkpoint, "--stop-after-steps", "2")
    result = cpm("train", "finetune", *args, "-m", tiny_checkpoint, "--batch-size", "2", "--resume", code=1)
    assert "batch_size: 4 -> 2" in str(result.exception)
    result = cpm("train", "finetune", *args, "-m", tiny_checkpoint, code=1)
    assert "already holds a training run" in str(result.exception)


def test_max_len_above_context_and_vocab_mismatch_are_refused(
    seed_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from trainer.errors import TrainError
    from trainer.sp_train import train_tokenizer

    result = cpm("train", "finetune", seed_dir, "-o", tmp_path / "a", "-m", tiny_checkpoint, "--max-len", "256", code=1)
    assert isinstance(result.exception, TrainError) and "exceeds the model's context of 128" in str(result.exception)
    other = train_tokenizer([seed_dir], tmp_path / "other.model", vocab_size=264)
    result = cpm(
        "train", "finetune", seed_dir, "-o", tmp_path / "b", "-m", tiny_checkpoint, "--tokenizer", other, code=1
    )
    assert isinstance(result.exception, TrainError) and "wrong tokenizer" in str(result.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_malformed_data_error_from_the_cli(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"title": 3, "content": "x"}\n', encoding="utf-8")
    args = ("train", "finetune", bad, "-o", tmp_path / "run", "-m", tiny_checkpoint, "--cache-dir", tmp_path / "c")
    result = cpm(*args, "--strict", code=1)  # without --strict the line is skipped (tests/test_documents.py)
    assert str(result.exception).startswith(f"{bad}:2:")


def test_new_model_from_tokenizer(seed_dir: Path, tiny_vocab: Path, tmp_path: Path) -> None:
    from cpm_infer.checkpoint import open_checkpoint

    run = tmp_path / "run"
    cpm(
        "train",
        "finetune",
        seed_dir,
        "-o",
        run,
        "--tokenizer",
        tiny_vocab,
        "--layers",
        "1",
        "--heads",
        "2",
        "--hidden",
        "16",
        "--context",
        "32",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--val-fraction",
        "0",
        "--cache-dir",
        tmp_path / "c",
        "--grad-checkpointing",
        "--precision",
        "bf16",
    )  # bf16 autocast runs on CPU too
    spec = open_checkpoint(run / "last").spec
    assert (spec.n_layer, spec.n_embd, spec.n_positions) == (1, 16, 32)
    assert not (run / "best").exists()  # no held-out data, no best
    result = cpm(
        "train", "finetune", seed_dir, "-o", tmp_path / "fp16", "--tokenizer", tiny_vocab, "--precision", "fp16", code=1
    )
    assert "fp16 mixed precision needs a CUDA GPU" in str(result.exception)


def test_distill_from_the_cli(seed_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from cpm_infer.torch_model import load_model

    run = tmp_path / "run"
    cpm(
        "train",
        "distill",
        *common(seed_dir, run, tmp_path / "cache"),
        "--teacher",
        tiny_checkpoint,
        "--student-layers",
        "1",
        "--temperature",
        "2",
        "--alpha",
        "0.7",
        "--max-steps",
        "4",
    )
    student, _ = load_model(run / "last")
    teacher, _ = load_model(tiny_checkpoint)
    assert student.config.n_layer == 1 and teacher.config.n_layer == 2
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    result = cpm(
        "train",
        "distill",
        *common(seed_dir, tmp_path / "x", tmp_path / "cache"),
        "--teacher",
        tiny_checkpoint,
        "--layer-map",
        "1,0",
        code=1,
    )
    assert "layer map" in str(result.exception)


def test_student_initialisation_and_kd_loss(tiny_checkpoint: Path) -> None:
    import torch

    from cpm_infer.torch_model import load_model
    from trainer.distill import Distillation, pick_layers, student_from_teacher

    assert pick_layers(12, 4) == [0, 4, 7, 11] and pick_layers(12, 1) == [11] and pick_layers(2, 2) == [0, 1]
    teacher, tok = load_model(tiny_checkpoint)
    student = student_from_teacher(teacher, [1])
    assert torch.equal(student.transformer.h[0].attn.c_attn.weight, teacher.transformer.h[1].attn.c_attn.weight)
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()

    ids = torch.tensor([tok.encode("话说天下大势，分久必合")])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    twin = student_from_teacher(teacher, [0, 1]).eval()
    with torch.no_grad():
        kd_only, count = Distillation(teacher, 2.0, 1.0).loss(twin, batch)
        lm_only, _ = Distillation(teacher, 2.0, 0.0).loss(student.eval(), batch)
        mixed, _ = Distillation(teacher, 2.0, 0.5).loss(student.eval(), batch)
        kd, _ = Distillation(teacher, 2.0, 1.0).loss(student.eval(), batch)
    assert float(kd_only) == pytest.approx(0.0, abs=1e-4) and int(count) == ids.shape[1] - 1
    assert float(mixed) == pytest.approx(0.5 * float(kd) + 0.5 * float(lm_only), rel=1e-5)


def test_early_stopping(seed_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # An lr of 1e-30 leaves every held-out loss exactly equal: no improvement after the first evaluation.
    run = tmp_path / "run"
    args = common(seed_dir, run, tmp_path / "cache")
    result = cpm(
        "train",
        "finetune",
        *args,
        "-m",
        tiny_checkpoint,
        "--eval-every",
        "2",
        "--patience",
        "1",
        "--lr",
        "1e-30",
        "--schedule",
        "constant",
        "--warmup-steps",
        "0",
    )
    assert "trained 4/8 steps (early stopping)" in result.output
    assert json.loads((run / "best" / "trainer_state.json").read_text())["step"] == 2
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 4
