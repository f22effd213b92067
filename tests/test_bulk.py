"""`cpm batch`'s pieces without a Ray cluster: prompt parsing (as `cpm generate --input`), the output directory's
manifest and finished parts, and the worker (the Ray Data actor's class, called directly)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from cpm_infer.bulk.job import (
    BulkError,
    BulkJob,
    contiguous_runs,
    covered,
    describe_inputs,
    finished_ranges,
    open_output,
    part_name,
    request_from_record,
)
from cpm_infer.bulk.worker import PartWriter
from cpm_infer.config import GenerationConfig
from cpm_infer.jobs import read_requests

LINES = [
    "天下大势",
    "  ",
    '{"prompt": "话说天下"}',
    '  {"title": "春天", "context": "春天来了"}',
    '{"title": "无题"}',
    '{"title": "数字", "context": 12}',
    "{不是 JSON 的开头}",
    " 前后有空格 ",
    "",
]
SAMPLED = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=40, seed=5, num_samples=2)


def test_parquet_records():
    assert request_from_record("p", None, None, "f") == {"prompt": "p"}
    assert request_from_record(None, "t", None, "f") == {"title": "t", "context": ""}
    with pytest.raises(BulkError, match="neither"):
        request_from_record(None, None, "c", "f.parquet")


def test_covered_and_runs_agree_with_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = np.sort(rng.choice(200, size=8, replace=False))
        ranges = [(int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2], strict=True)]
        ids = np.sort(rng.choice(220, size=60, replace=False)).astype(np.int64)
        brute = np.array([any(a <= i < b for a, b in ranges) for i in ids])
        assert (covered(ids, ranges) == brute).all()
        runs = contiguous_runs(ids)
        assert [i for a, b in runs for i in range(a, b)] == ids.tolist()
        assert all(b2 > a2 > b1 for (_, b1), (a2, b2) in itertools.pairwise(runs))
    assert covered(np.arange(3), []).tolist() == [False] * 3 and contiguous_runs(np.array([], dtype=np.int64)) == []


def _job(tmp_path: Path, model: Path, **kw) -> BulkJob:
    return BulkJob(
        **{"model": str(model), "output": str(tmp_path / "out"), "config": SAMPLED, "backend": "torch", **kw}
    )


def test_output_directory_is_one_job(tmp_path, tiny_checkpoint):
    (tmp_path / "in.txt").write_text("a\nb\n", encoding="utf-8")
    inputs = describe_inputs([tmp_path / "in.txt"])
    job = _job(tmp_path, tiny_checkpoint)
    assert open_output(job, inputs) is False and not (tmp_path / "out").exists()  # a check creates nothing
    assert open_output(job, inputs, 2) is False and (tmp_path / "out" / "job.json").is_file()
    assert open_output(job, inputs, 2) is True  # the same job again: a rerun
    with pytest.raises(BulkError, match=r"different config\.seed"):
        open_output(dataclasses.replace(job, config=SAMPLED.replace(seed=6)), inputs)
    (tmp_path / "in.txt").write_text("a\nc\n", encoding="utf-8")
    with pytest.raises(BulkError, match="different inputs"):
        open_output(job, describe_inputs([tmp_path / "in.txt"]))
    with pytest.raises(BulkError, match="different prompts"):
        open_output(job, inputs, 3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    with pytest.raises(BulkError, match="not a cpm batch output"):
        open_output(dataclasses.replace(job, output=str(tmp_path / "other")), inputs, 2)
    with pytest.raises(BulkError, match="fixed seed"):
        _job(tmp_path, tiny_checkpoint, config=SAMPLED.replace(seed=None))


def test_finished_ranges_ignore_temporary_files(tmp_path):
    (tmp_path / part_name(4, 8, "jsonl")).write_text("")
    (tmp_path / part_name(0, 4, "parquet")).write_text("")
    (tmp_path / f".{part_name(8, 12, 'jsonl')}.tmp-123").write_text("")
    assert finished_ranges(tmp_path) == [(0, 4), (4, 8)]
    assert finished_ranges(tmp_path / "missing") == []


def _batch(requests: list[dict[str, str]], ids: list[int]) -> dict[str, np.ndarray]:
    column = {c: np.array([r.get(c) for r in requests], dtype=object) for c in ("prompt", "title", "context")}
    return {"id": np.array(ids, dtype=np.int64), **column}


def test_worker_writes_what_cpm_generate_writes(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    path = tmp_path / "in.jsonl"
    lines = [line for line in LINES if not line.startswith("{不是")] + [f"第{i}回" for i in range(4)]
    path.write_text("\n".join(lines), encoding="utf-8")
    requests = read_requests(path)  # as `cpm generate --input` reads it (the pipeline's tasks call the same)
    assert len(requests) == 10
    args = ["-i", str(path), "-o", str(tmp_path / "single.jsonl"), "-n", "10", "-t", "0.9", "--top-k", "40"]
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "generate",
        "-m",
        str(tiny_checkpoint),
        *args,
        "--seed",
        "5",
        "--num-samples",
        "2",
        "--batch-size",
        "3",
    )
    assert code == 0, err
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]

    for fmt in ("jsonl", "parquet"):
        job = _job(tmp_path, tiny_checkpoint, batch_size=3, fmt=fmt, output=str(tmp_path / fmt))
        Path(job.output).mkdir()
        writer = PartWriter(job)
        order = [5, 6, 7, 8, 9, 0, 1, 2, 3]  # shuffled, and 4 missing: two runs, 0..3 and 5..9
        summary = writer(_batch([requests[i] for i in order], order))
        assert summary["start"].tolist() == [0, 5] and summary["end"].tolist() == [4, 10]
        assert summary["rows"].tolist() == [8, 10] and len(set(summary["worker"])) == 1
        writer(_batch([requests[4]], [4]))
        assert finished_ranges(job.output) == [(0, 4), (4, 5), (5, 10)]
        bulk = _read_parts(Path(job.output), fmt)
        assert [r["index"] for r in bulk] == [i for i in range(10) for _ in range(2)]
        assert {r["seed"] for r in bulk} == {5}
        assert [{k: v for k, v in r.items() if k != "seed"} for r in bulk] == single


def _read_parts(out: Path, fmt: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(out.glob(f"part-*.{fmt}")):
        if fmt == "jsonl":
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            import pyarrow.parquet as pq

            for row in pq.read_table(path).to_pylist():  # unused columns are null
                rows.append({k: v for k, v in row.items() if v is not None or k in ("text",)})
    return rows


def test_worker_refuses_a_too_long_prompt_by_its_index(tmp_path, tiny_checkpoint):
    job = _job(tmp_path, tiny_checkpoint)
    (tmp_path / "out").mkdir()
    with pytest.raises(BulkError, match=r"prompt 41 has 1000 tokens .*\(--truncate\)"):
        PartWriter(job)(_batch([{"prompt": "天下大势" * 200}], [41]))
    assert finished_ranges(job.output) == []  # nothing half-written
    truncated = PartWriter(dataclasses.replace(job, truncate=True))
    assert truncated(_batch([{"prompt": "天下大势" * 200}], [41]))["rows"].tolist() == [2]


def test_cli_errors_come_before_ray_starts(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    model = ["-m", str(tiny_checkpoint)]
    code, _, err = run_cli(monkeypatch, capsys, "batch", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"), *model)
    assert code == 1 and err.strip() == f"error: input file not found: {tmp_path / 'nope.txt'}"
    (tmp_path / "in.txt").write_text("a\n", encoding="utf-8")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "busy"), *model)
    assert code == 1 and "not a cpm batch output directory" in err and err.count("\n") == 1
    code, _, err = run_cli(
        monkeypatch, capsys, "batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), *model, "--format", "csv"
    )
    assert code == 1 and "unknown output format 'csv'" in err


def test_worker_with_a_draft_writes_the_same_greedy_records(tmp_path, tiny_checkpoint):
    """cpm batch --draft: the worker opens the draft and every generate() call speculates (batch size 1: one
    sequence at a time); greedy records equal those written without it; the draft is part of the job's identity."""
    requests = [{"prompt": p} for p in ("话说天下大势", "滚滚长江东逝水", "却说曹操")]
    config = GenerationConfig(max_new_tokens=12, temperature=0, seed=3)
    records = {}
    for draft in (None, "ngram", str(tiny_checkpoint)):
        job = BulkJob(model=str(tiny_checkpoint), output=str(tmp_path / f"out-{draft is None}"), config=config,
                      backend="torch", batch_size=1, draft=draft)  # fmt: skip
        writer = PartWriter(job)
        assert (writer.draft is None) == (draft is None)
        records[draft] = writer.generate(0, requests)
        assert ("draft" in job.describe()) == (draft is not None)
    assert records["ngram"] == records[None] and records[str(tiny_checkpoint)] == records[None]
    with pytest.raises(BulkError, match="draft model not found"):
        BulkJob(model=str(tiny_checkpoint), output=str(tmp_path / "o"), config=config, draft=str(tmp_path / "nope"))
    with pytest.raises(BulkError, match="not beam search"):
        BulkJob(model=str(tiny_checkpoint), output="o", config=config.replace(num_beams=2), draft="ngram")
