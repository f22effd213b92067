"""What fine-tuning and distillation share before the loop: runtime, data, checks, fingerprints."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.atomic import clean_stale
from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.tokenizer import CpmTokenizer
from trainer.batches import eval_windows, split_documents, train_windows
from trainer.config import TrainConfig
from trainer.errors import ResumeError, TrainError
from trainer.formats import ReadSummary
from trainer.loop import Callbacks, Data
from trainer.state import find_resumable
from trainer.windows import Progress, load_windows

log = logging.getLogger(__name__)


class RunSetup:
    """What fine-tuning and distillation do around their own model loading, in this order: make the
    accelerator and find the checkpoint to resume from (refusing to overwrite a run without --resume,
    before anything slow), :meth:`load_data`, then :meth:`loop_arguments` just before the loop."""

    def __init__(self, cfg: TrainConfig, callbacks: Callbacks | None = None, progress: Progress | None = None) -> None:
        self.cfg, self.callbacks, self.progress = cfg, callbacks, progress
        self.accelerator = make_accelerator(cfg)
        self.resume = resume_source(cfg)
        self.data: Data | None = None
        self.tokenizer_file: Path | None = None
        self.fingerprint: dict[str, Any] = {}  # what a resume must match

    def load_data(self, tokenizer: CpmTokenizer, n_positions: int) -> Data:
        """The run's windows for a model of ``n_positions`` (rank 0 builds the cache first)."""
        cfg = self.cfg
        max_len, stride = cfg.resolve_lengths(n_positions)
        self.data, data_fp = load_data_main_first(
            self.accelerator, cfg, tokenizer, max_len, stride, self.progress, self.callbacks
        )
        self.tokenizer_file = tokenizer.path
        self.fingerprint = {**cfg.trajectory(), "max_len": max_len, "stride": stride, **data_fp}
        self.fingerprint["tokenizer"] = file_sha256(tokenizer.path)
        return self.data

    def loop_arguments(self, spec: ModelSpec, objective: str, **fingerprint: Any) -> dict[str, Any]:
        """Seed this process, create the output directory and return the keyword arguments of
        :func:`trainer.loop.run`; ``fingerprint``: what else a resume must match (the model's origin)."""
        seed_everything(self.cfg.seed + self.accelerator.process_index)
        self.cfg.output.mkdir(parents=True, exist_ok=True)
        return {
            "tokenizer_file": self.tokenizer_file,
            "fingerprint": {**self.fingerprint, "spec": spec.to_dict(), "objective": objective, **fingerprint},
            "accelerator": self.accelerator,
            "callbacks": self.callbacks,
            "resume_dir": self.resume,
        }


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this process: single device, or DDP/DeepSpeed under torchrun/accelerate launch."""
    torch = require("torch", "torch")
    accelerate = require("accelerate", "train")
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        raise TrainError("fp16 mixed precision needs a CUDA GPU; use --precision fp32 or bf16 on CPU")
    # The state is a per-process singleton: reset it so consecutive runs in one process (tests,
    # notebooks) can change settings.
    accelerate.state.AcceleratorState._reset_state(True)
    return accelerate.Accelerator(cpu=not on_gpu, mixed_precision={"fp32": "no"}.get(precision, precision))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_vocab(tokenizer: CpmTokenizer, spec: ModelSpec, where: Path | str) -> None:
    if tokenizer.vocab_size != spec.vocab_size:
        raise TrainError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model at {where} embeds "
            f"{spec.vocab_size}: wrong tokenizer for this model"
        )


def resume_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run without --resume. Staging
    directories of saves killed outright are removed first (a version left aside mid-swap is restored)."""
    for name in ("last", "best"):
        clean_stale(cfg.output / name)
    if cfg.resume:
        return find_resumable(cfg.output)
    if (cfg.output / "last").exists() or (cfg.output / "best").exists():
        raise ResumeError(
            f"{cfg.output} already holds a training run; pass --resume to continue it or choose another --output"
        )
    return None


def load_data_main_first(
    accelerator: Any,
    cfg: TrainConfig,
    tokenizer: CpmTokenizer,
    max_len: int,
    stride: int,
    progress: Progress | None,
    callbacks: Any = None,
) -> tuple[Data, dict]:
    """``load_data`` in a distributed run: rank 0 builds the token cache, the others then read it; only rank 0
    shows progress and reports to ``callbacks.on_data``."""
    main = accelerator.is_main_process
    with accelerator.main_process_first():
        return load_data(
            cfg,
            tokenizer,
            max_len,
            stride,
            progress if main else None,
            report=callbacks.on_data if callbacks and main else None,
        )


def load_data(
    cfg: TrainConfig,
    tokenizer: CpmTokenizer,
    max_len: int,
    stride: int,
    progress: Progress | None,
    report: Callable[[str, ReadSummary], None] | None = None,
) -> tuple[Data, dict]:
    """Cached train/held-out windows and the data part of the run fingerprint; ``report`` gets what
    reading each data set did (documents kept, skipped by reason)."""
    reading = {"fmt": cfg.data_format, "cache_dir": cfg.cache_dir, "strict": cfg.strict, "encoding": cfg.encoding}
    cache = load_windows(cfg.data, tokenizer, max_len, stride, progress=progress, **reading)
    log.info("training data: %s", cache.summary.describe())
    if report is not None:
        report("train", cache.summary)
    if cfg.val_data:
        val_cache = load_windows(cfg.val_data, tokenizer, max_len, max_len, **reading)
        if report is not None:
            report("held-out", val_cache.summary)
        train = np.asarray(cache.windows)
        val = eval_windows(val_cache, list(range(val_cache.n_docs)))
        fp = {"data": cache.directory.name, "val": val_cache.directory.name}
        return Data(cache, train, val, tokenizer.pad_id, val_cache=val_cache), fp
    train_docs, val_docs = split_documents(cache.n_docs, cfg.val_fraction, cfg.seed)
    if not train_docs:
        raise TrainError("no training documents are left after the held-out split")
    data = Data(cache, train_windows(cache, train_docs), eval_windows(cache, val_docs), tokenizer.pad_id)
    log.info(
        "%d documents: %d train windows, %d held-out windows (%d docs)",
        cache.n_docs,
        len(data.train),
        len(data.val),
        len(val_docs),
    )
    return data, {"data": cache.directory.name, "val_docs": hashlib.sha256(str(val_docs).encode()).hexdigest()[:16]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
