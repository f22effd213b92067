"""Learning-rate schedules: linear warmup, then linear or cosine decay (or constant)."""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.errors import TrainError

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """step -> multiplier of the peak learning rate (for torch's LambdaLR).

    Warmup rises linearly from 1/warmup to 1; decay goes from 1 to ``min_ratio`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1 or warmup_steps < 0:
        raise TrainError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup_steps, total_steps, min_ratio))
