"""cpm_infer.atomic: the one atomic directory writer (checkpoints, ONNX/quantized/TensorRT artifacts,
trainer saves), killed for real, and the removal of what killed writers leave behind."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from cpm_infer.atomic import BusyError, clean_stale, staged_dir

# A writer that fills a staged directory file by file, slowly, then swaps it in.
WRITER = """
import sys, time
from cpm_infer.atomic import staged_dir
dest, version = sys.argv[1], sys.argv[2]
with staged_dir(dest) as tmp:
    for i in range(6):
        (tmp / f"part{i}").write_text(version * 1000)
        time.sleep(0.02)
    (tmp / "COMPLETE").write_text(version)
"""
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def writer(dest: Path, version: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(dest), version], env=ENV, stderr=subprocess.PIPE)


def version_of(dest: Path) -> str | None:
    """The version a directory holds if it is complete (every part of one version), else fail."""
    if not dest.exists():
        return None
    version = (dest / "COMPLETE").read_text()
    assert sorted(p.name for p in dest.iterdir()) == ["COMPLETE", *(f"part{i}" for i in range(6))]
    assert all((dest / f"part{i}").read_text() == version * 1000 for i in range(6))
    return version


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(f".{dest.name}.*"))


def test_writer_killed_at_random_moments_leaves_absent_old_or_complete(tmp_path: Path) -> None:
    """The atomic writer of every artifact (the TensorRT engine writer included: it cannot be built here)."""
    dest = tmp_path / "out"
    kills = stale_removed = 0
    # Seeds until enough kills landed (how many do depends on the machine's speed, so no fixed count of runs).
    for seed in range(200):
        if kills >= 10 and stale_removed >= 5:
            break
        rng = random.Random(seed)
        before = version_of(dest)
        proc = writer(dest, f"v{seed}")
        deadline = time.monotonic() + 120
        while proc.poll() is None and not any(p.is_dir() for p in dest.parent.glob(".out.tmp-*")):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))  # six 20 ms writes, then the swap
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        after = version_of(dest)
        aside = [p for p in dest.parent.glob(".out.old-*")]
        if after is None and aside:  # killed between the two renames: the previous version is aside
            assert version_of(aside[0]) == before
        else:
            assert after in (before, f"v{seed}")
        stale = [p for p in dest.parent.glob(".out.tmp-*") if p.is_dir()]
        assert len(stale) <= 1
        if stale:
            done = writer(dest, "next")
            _, err = done.communicate(timeout=120)
            assert done.returncode == 0, err
            assert b"which is gone" in err
            stale_removed += 1
            assert version_of(dest) == "next" and leftovers(dest) == []
    print(f"atomic writer: {kills} SIGKILLs, {stale_removed} stale staging dirs removed by the next writer")
    assert kills >= 10 and stale_removed >= 5, (kills, stale_removed)


def test_stale_staging_removed_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "artifact"
    dead = _dead_pid()
    (tmp_path / f".artifact.tmp-{dead}").mkdir()
    (tmp_path / f".artifact.tmp-{dead}" / "model.onnx").write_bytes(b"half")
    (tmp_path / f".artifact.tmp-{dead + 1}.lock").write_text("")  # killed before its staging dir existed
    (tmp_path / ".other.tmp-1").mkdir()  # another target's: not ours to touch
    with caplog.at_level(logging.WARNING, logger="cpm_infer.atomic"):
        with staged_dir(dest) as tmp:
            (tmp / "f").write_text("x")
    assert (dest / "f").read_text() == "x"
    assert leftovers(dest) == [] and (tmp_path / ".other.tmp-1").is_dir()
    assert f"removed {tmp_path / f'.artifact.tmp-{dead}'}, left by process {dead}, which is gone" in caplog.text


def test_old_version_left_aside_mid_swap_is_restored(tmp_path: Path) -> None:
    dest = tmp_path / "last"
    aside = tmp_path / f".last.old-{_dead_pid()}"
    aside.mkdir()
    (aside / "state").write_text("step 4")
    clean_stale(dest)
    assert (dest / "state").read_text() == "step 4" and leftovers(dest) == []


def test_live_writer_is_not_disturbed_and_a_reused_pid_is_not_mistaken(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    slow = subprocess.Popen(
        [sys.executable, "-c", WRITER.replace("0.02", "5"), str(dest), "live"], env=ENV, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.is_dir() for p in tmp_path.glob(".out.tmp-*")):
            assert time.monotonic() < deadline and slow.poll() is None
            time.sleep(0.01)
        with pytest.raises(BusyError, match=f"being written by process {slow.pid}"):
            clean_stale(dest)
    finally:
        slow.kill()
        slow.wait()
    # the dead writer's PID now belongs to a live process (here: this one's parent); its lock is free
    reused = os.getppid()
    os.rename(next(tmp_path.glob(f".out.tmp-{slow.pid}")), tmp_path / f".out.tmp-{reused}")
    (tmp_path / f".out.tmp-{reused}.lock").write_text("")
    assert clean_stale(dest) == [tmp_path / f".out.tmp-{reused}"]
    assert leftovers(dest) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)
