"""The settings of a training run (shared by fine-tuning and distillation), validated once."""

from __future__ import annotations

import codecs
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.errors import TrainError
from trainer.formats import FORMATS
from trainer.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Settings that shape the optimisation trajectory: a resume must match them exactly.
TRAJECTORY_FIELDS = (
    "max_len",
    "stride",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "precision",
    "seed",
    "val_fraction",
    "data_format",
)


@dataclass
class TrainConfig:
    data: list[Path]
    output: Path
    val_data: list[Path] = field(default_factory=list)
    data_format: str = "auto"
    val_fraction: float = 0.05
    max_len: int | None = None  # default: min(512, model context)
    stride: int | None = None  # default: max_len (no overlap)
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    save_every: int = 0  # steps between saves of `last`; 0 = at each evaluation
    log_every: int = 10
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    precision: str = "auto"
    grad_checkpointing: bool = False
    seed: int = 42
    cache_dir: Path | None = None
    resume: bool = False
    stop_after_steps: int = 0  # end this session after so many steps (job time limits); 0 = off
    cpu: bool = False  # force CPU even where CUDA is available
    strict: bool = False  # refuse data that would be skipped or needs bytes replaced, naming file and line
    encoding: str | None = None  # force the data files' encoding (default: UTF-8, GB18030 detected)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainError(message)

        self.data = [Path(p) for p in self.data]
        self.val_data = [Path(p) for p in self.val_data]
        self.output = Path(self.output)
        need(bool(self.data), "no training data given")
        need(
            self.data_format in FORMATS, f"unknown data format {self.data_format!r}; choose one of {', '.join(FORMATS)}"
        )
        need(0 <= self.val_fraction < 1, f"val fraction must be in [0, 1), got {self.val_fraction}")
        need(self.max_len is None or self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}")
        need(self.stride is None or self.stride >= 1, f"stride must be >= 1, got {self.stride}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "patience", "warmup_steps", "stop_after_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight decay and max grad norm must be >= 0")
        need(0 <= self.min_lr_ratio <= 1, f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        need(
            self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
        if self.encoding is not None:
            try:
                self.encoding = codecs.lookup(self.encoding).name
            except LookupError as exc:
                raise TrainError(f"unknown encoding {self.encoding!r} (e.g. utf-8, gb18030, big5)") from exc
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size

    def resolve_lengths(self, n_positions: int) -> tuple[int, int]:
        """(max_len, stride) for a model with ``n_positions``; max_len above the context is refused."""
        max_len = self.max_len if self.max_len is not None else min(512, n_positions)
        if max_len > n_positions:
            raise TrainError(f"max_len {max_len} exceeds the model's context of {n_positions} positions")
        stride = self.stride if self.stride is not None else max_len
        if stride > max_len:
            raise TrainError(f"stride {stride} exceeds max_len {max_len}: tokens between windows would be skipped")
        return max_len, stride

    def trajectory(self) -> dict:
        values = asdict(self)
        return {name: values[name] for name in TRAJECTORY_FIELDS}
