"""Run checkpoints (atomic saves, interrupted saves, resume discovery), RNG capture, schedules, metrics."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

from trainer.errors import ResumeError, TrainError
from trainer.schedule import lr_factor
from trainer.state import (
    TRAINING_STATE,
    MetricsLog,
    capture_rng,
    check_fingerprint,
    find_resumable,
    load_training_state,
    read_metrics,
    restore_rng,
    save_run_checkpoint,
)


@pytest.fixture()
def tiny(tiny_vocab: Path):
    from conftest import make_tiny_model

    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    return make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id), tiny_vocab


def test_save_writes_a_loadable_checkpoint_with_state(tiny, tmp_path: Path) -> None:
    import torch

    from cpm_infer.torch_model import load_model

    model, vocab = tiny
    dest = save_run_checkpoint(model, vocab, tmp_path / "last", {"step": 3}, {"step": 3, "x": torch.arange(4)})
    loaded, _ = load_model(dest)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert load_training_state(dest)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no staging leftovers


def test_interrupted_save_keeps_the_previous_checkpoint(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cpm_infer.torch_model import load_model

    model, vocab = tiny
    dest = save_run_checkpoint(model, vocab, tmp_path / "last", {"step": 1}, {"step": 1})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if str(path).endswith(TRAINING_STATE):
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of a save
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_run_checkpoint(model, vocab, dest, {"step": 2}, {"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_training_state(find_resumable(tmp_path))["step"] == 1
    load_model(dest)


def test_resume_finds_the_checkpoint_set_aside_by_a_dead_save(tiny, tmp_path: Path) -> None:
    model, vocab = tiny
    dest = save_run_checkpoint(model, vocab, tmp_path / "last", {"step": 4}, {"step": 4})
    dest.rename(tmp_path / f".last.old-{os.getpid()}")  # died between the two renames of a swap
    assert load_training_state(find_resumable(tmp_path))["step"] == 4


def test_resume_refusals(tiny, tmp_path: Path) -> None:
    model, vocab = tiny
    with pytest.raises(ResumeError, match="nothing to resume"):
        find_resumable(tmp_path)
    save_run_checkpoint(model, vocab, tmp_path / "last", {"step": 1}, None)
    with pytest.raises(ResumeError, match="not a resumable checkpoint"):
        find_resumable(tmp_path)
    (tmp_path / "last" / TRAINING_STATE).write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="cannot read"):
        load_training_state(tmp_path / "last")
    with pytest.raises(ResumeError, match=r"lr: 0.001 -> 0.002; world_size: 2 -> 1"):
        check_fingerprint({"lr": 1e-3, "seed": 1, "world_size": 2}, {"lr": 2e-3, "seed": 1, "world_size": 1}, tmp_path)
    check_fingerprint({"a": [1, 2]}, {"a": [1, 2]}, tmp_path)


def test_rng_capture_restores_every_generator() -> None:
    import torch

    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])


def test_schedules() -> None:
    linear = lr_factor("linear", 10, 110)
    assert (
        linear(0) == pytest.approx(0.1) and linear(9) == 1.0 and linear(60) == pytest.approx(0.5) and linear(110) == 0.0
    )
    cosine = lr_factor("cosine", 0, 100, min_ratio=0.1)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    assert lr_factor("constant", 2, 10)(7) == 1.0
    with pytest.raises(TrainError):
        lr_factor("exp", 0, 10)
    assert all(
        0 <= lr_factor("cosine", 5, 50)(s) <= 1 and not math.isnan(lr_factor("cosine", 5, 50)(s)) for s in range(60)
    )


def test_metrics_log_drops_rows_past_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, None)
    for step in (1, 2, 3):
        log.write(step=step, epoch=0, split="train", loss=1.0 / step, lr=1e-4)
    MetricsLog(path, 2).write(step=3, epoch=0, split="train", loss=0.5)
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1"), ("2", "0.5"), ("3", "0.5")]
