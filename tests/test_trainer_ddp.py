"""The distributed path: `cpm train finetune` under torchrun with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS
from typer.testing import CliRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_data_parallel_finetune(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    import torch

    from cpm_infer.cli.app import app
    from trainer.state import load_training_state, read_metrics

    data = tmp_path / "essays.jsonl"
    lines = CORPUS.strip().splitlines()
    data.write_text(
        "".join(
            json.dumps({"title": f"第{i}篇", "content": "\n".join(lines[i:] + lines[:i])}, ensure_ascii=False) + "\n"
            for i in range(8)
        ),
        encoding="utf-8",
    )
    run = tmp_path / "run"
    args = [
        str(data),
        "-o",
        str(run),
        "-m",
        str(tiny_checkpoint),
        "--max-len",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--warmup-steps",
        "1",
        "--lr",
        "3e-3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--val-fraction",
        "0.25",
        "--cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "cpm_infer.cli.app",
        "train",
        "finetune",
        *args,
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    state = load_training_state(run / "last")
    assert state["step"] == 4 and state["fingerprint"]["world_size"] == 2
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows if r["split"] == "train"] == ["1", "2", "3", "4"]  # rank 0 alone writes
    assert (run / "best" / "model.safetensors").is_file()
    assert "trained 4/4 steps" in proc.stderr and proc.stderr.count("trained 4/4 steps") == 1

    # One process cannot continue a two-process run exactly: refused.
    result = CliRunner().invoke(app, ["train", "finetune", *args, "--resume"])
    assert result.exit_code == 1 and "world_size: 2 -> 1" in str(result.exception)
