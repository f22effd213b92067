"""Crash consistency: real `cpm` subprocesses killed with SIGKILL at random moments, many seeds.

After each kill the output is absent, the previous version, or complete and valid; the next run
removes the killed run's staging directory and says so; a killed training run resumes exactly; a
killed `cpm generate --output` leaves only complete lines and `--resume` finishes it as one run would.

Each test runs seeds until its time budget is spent (at least one kill): ``CPM_KILL_BUDGET_S`` (default 12 s per
test: on 2 cores at least two kills, late and early in the window (seeds 0 and 1), and their resumes; raise it for a
longer soak) and ``CPM_KILL_SEEDS`` (the most seeds per test, default 20) set them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

BUDGET_S = float(os.environ.get("CPM_KILL_BUDGET_S", "12"))
MAX_SEEDS = int(os.environ.get("CPM_KILL_SEEDS", "20"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CPM_DEBUG": ""}
CPM = [sys.executable, "-m", "cpm_infer.cli.app"]


def seeds() -> range:
    """Seeds for one test; the loop stops early once the budget is spent (see ``spent``)."""
    return range(MAX_SEEDS)


class Budget:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.kills = 0

    def spent(self) -> bool:
        return self.kills >= 1 and time.monotonic() - self.start > BUDGET_S


def run(args: list[str], log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    with log.open("w") as err:
        proc = subprocess.run([*CPM, *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text(errors="replace"))


def timed(args: list[str], log: Path, started: Callable[[], bool]) -> float:
    """Run to completion; seconds from ``started()`` first being true to the exit (the window worth hitting)."""
    with log.open("w") as err:
        proc = subprocess.Popen([*CPM, *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        while proc.poll() is None and not started():
            time.sleep(0.01)
        begin = time.monotonic()
        assert proc.wait(timeout=600) == 0, log.read_text()
    return max(time.monotonic() - begin, 0.05)


def kill_at_random(args: list[str], log: Path, started: Callable[[], bool], window: float, seed: int) -> bool:
    """Start ``cpm ARGS``, wait until ``started()``, SIGKILL it after a random part of ``window``.
    Returns False if it finished first."""
    delay = random.Random(seed).uniform(0, window)
    with log.open("w") as err:
        proc = subprocess.Popen([*CPM, *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 600
        while proc.poll() is None and not started():
            assert time.monotonic() < deadline, "the command never reached the point to kill it at"
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        return True


def siblings(target: Path, locks: bool = True) -> list[Path]:
    """What writers of ``target`` left next to it (staging dirs, an old version aside, lock files)."""
    return sorted(p for p in target.parent.glob(f".{target.name}.*") if locks or not p.name.endswith(".lock"))


def staging_exists(target: Path) -> Callable[[], bool]:
    return lambda: any(p.is_dir() for p in target.parent.glob(f".{target.name}.tmp-*"))


def check_onnx_artifact(path: Path) -> None:
    """Complete and valid: the manifest and every file it names, a graph ONNX Runtime loads."""
    import onnxruntime as ort

    from cpm_infer.artifact import read_manifest

    manifest = read_manifest(path)
    ort.InferenceSession(str(path / manifest.graph_files["model"]), providers=["CPUExecutionProvider"])


def _kill_export_repeatedly(args: list[str], out: Path, logs: Path, fresh: bool) -> tuple[int, int]:
    """Kill the export at random moments until the budget is spent; returns (kills, stale removals seen)."""
    budget, removals = Budget(), 0
    window = timed([*args, "--force"], logs / "reference.log", staging_exists(out))
    check_onnx_artifact(out)
    for seed in seeds():
        if budget.spent():
            break
        if fresh and seed % 2 == 0:
            shutil.rmtree(out, ignore_errors=True)
        existed = out.exists()
        had_stale = any(p.is_dir() for p in siblings(out))
        log = logs / f"kill-{seed}.log"
        killed = kill_at_random([*args, "--force"], log, staging_exists(out), window, seed)
        budget.kills += killed
        if had_stale and "which is gone" in log.read_text():
            removals += 1
        # absent (when it was), or the old or the new artifact, complete and valid; killed between the two
        # renames of the swap, the old one is aside (the next run puts it back)
        aside = [p for p in siblings(out) if ".old-" in p.name]
        if out.exists():
            check_onnx_artifact(out)
        elif existed:
            assert len(aside) == 1, siblings(out)
            check_onnx_artifact(aside[0])
        assert len([p for p in siblings(out) if ".tmp-" in p.name and p.is_dir()]) <= 1  # the killed run's only
    had_stale = any(p.is_dir() for p in siblings(out))
    final = run([*args, "--force"], logs / "final.log")
    assert final.returncode == 0, final.stderr
    removals += had_stale and "which is gone" in final.stderr
    check_onnx_artifact(out)
    assert siblings(out) == []
    return budget.kills, removals


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("src") / "fp32").path


def test_onnx_export_killed_leaves_absent_old_or_complete(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    kills, removals = _kill_export_repeatedly(["export", "onnx", str(tiny_checkpoint), str(out)], out, tmp_path, True)
    print(f"onnx export: {kills} SIGKILLs, {removals} stale staging dirs removed by the next run")
    assert kills >= 1


def test_quantized_export_killed_leaves_old_or_complete(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    args = ["export", "onnx", str(artifact), str(out), "--quantize", "int8", "--force-quality"]
    kills, removals = _kill_export_repeatedly(args, out, tmp_path, False)
    print(f"int8 export: {kills} SIGKILLs, {removals} stale staging dirs removed by the next run")
    assert kills >= 1


def test_next_export_removes_a_killed_runs_staging_and_says_so(artifact: Path, tmp_path: Path) -> None:
    """Issue: a killed run's staging directory stayed forever. Kill one for sure, while it is staged."""
    out = tmp_path / "int8"
    args = ["export", "onnx", str(artifact), str(out), "--quantize", "int8", "--force-quality"]
    for _ in range(10):  # killed as soon as its staging dir appears; a stalled test may miss it, then again
        if kill_at_random(args, tmp_path / "kill.log", staging_exists(out), 0.0, 0) and not out.exists():
            break
        shutil.rmtree(out, ignore_errors=True)
        for path in siblings(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        pytest.fail("the export finished before every kill")
    (stale,) = siblings(out, locks=False)
    assert stale.is_dir() and not out.exists()
    result = run(args, tmp_path / "next.log")
    assert result.returncode == 0, result.stderr
    assert f"removed {stale}" in result.stderr and "which is gone" in result.stderr
    assert siblings(out) == []
    check_onnx_artifact(out)


# ---------------------------------------------------------------------------------------------- training

TRAIN = ["--max-len", "32", "--batch-size", "4", "--max-steps", "6", "--save-every", "1", "--eval-every", "3"]
TRAIN += ["--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", "--val-fraction", "0.25", "--seed", "7"]


def _essays(tmp: Path) -> Path:
    out = tmp / "essays"
    out.mkdir()
    lines = CORPUS.strip().splitlines()
    for i in range(8):
        body = "\n\n".join(lines[i:] + lines[:i])
        (out / f"essay{i}.txt").write_text(f"---\n标题：第{i}篇\n---\n\n{body}\n", encoding="utf-8")
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    from trainer.state import read_metrics

    return {int(r["step"]): float(r["loss"]) for r in read_metrics(run_dir / "metrics.csv") if r["split"] == "train"}


def test_training_killed_resumes_exactly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    data = _essays(tmp_path)
    common = ["train", "finetune", str(data), "-m", str(tiny_checkpoint), "--cache-dir", str(tmp_path / "c"), *TRAIN]
    reference = tmp_path / "reference"
    first_save = lambda d: lambda: (d / "last").exists()  # noqa: E731
    window = timed([*common, "-o", str(reference)], tmp_path / "ref.log", first_save(reference))
    want = load_file(str(reference / "last" / "model.safetensors"))
    budget = Budget()
    for seed in seeds():
        if budget.spent():
            break
        run_dir = tmp_path / f"run{seed}"
        budget.kills += kill_at_random(
            [*common, "-o", str(run_dir)], tmp_path / f"kill{seed}.log", first_save(run_dir), window, seed
        )
        saved = (run_dir / "last").exists() or any(run_dir.glob(".last.old-*"))
        result = run([*common, "-o", str(run_dir), *(["--resume"] if saved else [])], tmp_path / f"resume{seed}.log")
        assert result.returncode == 0, result.stderr
        assert _losses(run_dir) == pytest.approx(_losses(reference), rel=1e-5)
        got = load_file(str(run_dir / "last" / "model.safetensors"))
        assert all((got[k] - v).abs().max() <= 1e-6 for k, v in want.items())
        assert siblings(run_dir / "last") == [] and siblings(run_dir / "best") == []
    print(f"training: {budget.kills} SIGKILLs, each resumed exactly")


def test_a_save_killed_halfway_is_never_resumed_from(tmp_path: Path) -> None:
    """What a SIGKILL leaves mid-save: a staging dir (never read) or, mid-swap, the old version aside."""
    from trainer.state import TRAINING_STATE, find_resumable

    run_dir = tmp_path / "run"
    (run_dir / "last").mkdir(parents=True)
    (run_dir / "last" / TRAINING_STATE).write_bytes(b"step 2")
    dead = _dead_pid()
    half = run_dir / f".last.tmp-{dead}"
    half.mkdir()
    (half / TRAINING_STATE).write_bytes(b"step 3, half written")
    assert find_resumable(run_dir) == run_dir / "last"
    (run_dir / "last").rename(run_dir / f".last.old-{dead}")  # killed between the two renames
    assert find_resumable(run_dir) == run_dir / f".last.old-{dead}"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# -------------------------------------------------------------------------------------------- generation

PROMPTS = [f"{CORPUS[i : i + 6]}" for i in range(0, 96, 8)]


def test_generate_killed_leaves_complete_lines_and_resume_finishes_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n", encoding="utf-8")
    common = ["generate", "-m", str(tiny_checkpoint), "-i", str(prompts), "-n", "12", "--num-samples", "2"]
    common += ["--batch-size", "2", "--seed", "5", "--backend", "torch"]
    reference = tmp_path / "reference.jsonl"
    window = timed([*common, "-o", str(reference)], tmp_path / "ref.log", reference.exists)
    budget = Budget()
    for seed in seeds():
        if budget.spent():
            break
        out = tmp_path / f"out{seed}.jsonl"
        budget.kills += kill_at_random([*common, "-o", str(out)], tmp_path / f"k{seed}.log", out.exists, window, seed)
        data = out.read_text(encoding="utf-8")
        assert data == "" or data.endswith("\n")  # whole records only
        for line in data.splitlines():
            record = json.loads(line)
            assert {"index", "sample", "text", "finish_reason"} <= set(record)
        result = run([*common, "-o", str(out), "--resume"], tmp_path / f"r{seed}.log")
        assert result.returncode == 0, result.stderr
        assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
    print(f"generate: {budget.kills} SIGKILLs, each resumed to the uninterrupted output")
