"""Batch generation jobs: resumable JSONL results (``cpm generate --output --resume``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from cpm_infer.jobs import JobError, ResultsFile, Run, pending_runs

PROMPTS = ["话说天下", "滚滚长江", '{"title": "赤壁", "context": "东风"}', "是非成败", "青山依旧", "几度夕阳"]


def test_pending_runs_keep_batch_boundaries() -> None:
    assert pending_runs(5, 2, set()) == [Run(0, 2), Run(2, 2), Run(4, 1)]
    assert pending_runs(5, 2, {0, 1, 3}) == [Run(2, 1), Run(4, 1)]
    assert pending_runs(6, 4, {1}) == [Run(0, 1), Run(2, 2), Run(4, 2)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 40), batch=st.integers(1, 9), done=st.sets(st.integers(0, 40)))
def test_pending_runs_cover_exactly_the_prompts_left(n: int, batch: int, done: set[int]) -> None:
    runs = pending_runs(n, batch, done)
    covered = [i for r in runs for i in range(r.start, r.start + r.count)]
    assert covered == [i for i in range(n) if i not in done]
    assert all(r.count <= batch and r.start // batch == (r.start + r.count - 1) // batch for r in runs)


def _records(index: int, samples: int, prompt: str) -> list[dict]:
    return [{"index": index, "prompt": prompt, "sample": s, "text": "x"} for s in range(samples)]


def test_resume_drops_a_torn_line_and_incomplete_prompts(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    requests = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    lines = [json.dumps(r) for r in _records(0, 2, "a") + _records(1, 1, "b")]
    path.write_text("\n".join(lines) + '\n{"index": 1, "prom', encoding="utf-8")
    results, done = ResultsFile.open(path, requests, 2, resume=True)
    with results:
        assert done == {0}
        results.write(_records(1, 2, "b"))
    got = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["sample"]) for r in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_resume_refuses_results_of_other_prompts(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_records(0, 1, "zzz")[0]) + "\n", encoding="utf-8")
    with pytest.raises(JobError, match=rf"{path}:1: this record is for another prompt"):
        ResultsFile.open(path, [{"prompt": "a"}], 1, resume=True)
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(JobError, match="not a result record"):
        ResultsFile.open(path, [{"prompt": "a"}], 1, resume=True)


def test_cli_resume_gives_what_an_uninterrupted_run_gives(monkeypatch, capsys, tmp_path, tiny_checkpoint) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    common = ("generate", "-m", str(tiny_checkpoint), "-i", str(prompts), "-n", "6", "--num-samples", "2")
    common += ("--batch-size", "4", "--seed", "11")
    assert run_cli(monkeypatch, capsys, *common, "-o", str(full))[0] == 0
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    # as if killed: prompts 0-1 complete, prompt 2 with one sample, and half a line
    part.write_text("".join(lines[:5]) + lines[5][:17], encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, *common, "-o", str(part), "--resume")
    assert code == 0, err
    assert "resuming: 2 of 6 prompts" in err
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "x", "--resume")
    assert code == 1 and "give --output" in err
