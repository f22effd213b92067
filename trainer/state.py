"""Run checkpoints: HF model dir + training state, written atomically; RNG capture; metrics CSV.

``<output>/last`` and ``<output>/best`` are checkpoint directories that ``cpm generate`` and
``cpm export onnx`` take as they are (written by ``cpm_infer.torch_model.save_checkpoint``).
``last`` also holds ``training_state.pt`` (optimizer, scheduler, loss scaler, RNG states, step,
data position, the run's fingerprint). Every save goes to a staging directory first and is then
swapped in with renames (``cpm_infer.atomic``), so an interrupted save leaves the previous checkpoint
intact, and the staging directory of a save killed outright is removed by the next save.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.atomic import staged_dir
from cpm_infer.errors import first_line
from trainer.errors import ResumeError

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
TRAINER_JSON = "trainer_state.json"
METRICS = "metrics.csv"
DEEPSPEED_STATE = "deepspeed"  # Accelerate's save_state of a ZeRO run (optimizer partitions per rank)
METRIC_FIELDS = ("step", "epoch", "split", "loss", "ppl", "lr", "tokens_per_s", "grad_norm", "elapsed_s")


def save_run_checkpoint(
    model,
    tokenizer_file: Path,
    dest: Path,
    info: dict,
    training_state: dict | None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write ``dest`` (model + tokenizer + generation config + trainer json [+ training state]) atomically;
    ``extra_dirs`` (name -> directory, e.g. DeepSpeed's per-rank shards) are moved inside before the swap."""
    import torch

    from cpm_infer.torch_model import write_checkpoint

    with staged_dir(dest) as staging:
        write_checkpoint(model, tokenizer_file, staging)
        (staging / TRAINER_JSON).write_text(
            json.dumps(info, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
        )
        if training_state is not None:
            torch.save(training_state, staging / TRAINING_STATE)
        for name, directory in (extra_dirs or {}).items():
            shutil.move(str(directory), str(staging / name))
    return dest


def find_resumable(output: Path) -> Path:
    """``output/last``, or the previous ``last`` kept aside when a save died between its two renames."""
    last = output / "last"
    if (last / TRAINING_STATE).is_file():
        return last
    aside = sorted(output.glob(".last.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in aside:
        if (candidate / TRAINING_STATE).is_file():
            log.warning("resuming from %s: the save that replaced it did not complete", candidate)
            return candidate
    if last.exists():
        raise ResumeError(f"{last} has no {TRAINING_STATE}: it is not a resumable checkpoint")
    raise ResumeError(f"nothing to resume in {output}: no last/ checkpoint (start without --resume)")


def load_training_state(directory: Path) -> dict:
    import torch

    path = directory / TRAINING_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file raises many types; report one line
        raise ResumeError(f"cannot read {path}: {first_line(exc)}") from exc


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """Refuse to resume when anything that shapes the trajectory differs."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ResumeError(f"cannot resume from {where}: it was trained with different settings ({shown})")


def capture_rng() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Append-only CSV of train/val metrics; on resume rows past the resumed step are dropped, so
    the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with path.open(encoding="utf-8", newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row: Any) -> None:
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            csv.DictWriter(handle, METRIC_FIELDS).writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})


def read_metrics(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.6e}"
    return "" if value is None else value
