"""The training loop shared by fine-tuning and distillation (Accelerate: one process, DDP or DeepSpeed).

One optimizer step consumes ``grad_accum`` micro-batches; the data position is a pure function of
the step (see :class:`trainer.batches.EpochSampler`), so resuming needs only the step counter plus
the optimizer, scheduler, scaler and RNG states. Ctrl-C sets a flag checked between steps: the step
in flight finishes, ``last`` is saved, then :class:`TrainingInterrupted` is raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trainer.batches import EpochSampler, collate, eval_batches
from trainer.config import TrainConfig
from trainer.errors import TrainError, TrainingInterrupted
from trainer.formats import ReadSummary
from trainer.schedule import make_scheduler
from trainer.state import (
    DEEPSPEED_STATE,
    METRICS,
    MetricsLog,
    capture_rng,
    check_fingerprint,
    load_training_state,
    restore_rng,
    save_run_checkpoint,
)
from trainer.windows import TokenCache

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What a step minimises: ``loss(model, batch) -> (sum of per-token losses, token count)``.
    With ``eval_mode`` it returns the held-out measure (language-model loss)."""

    def loss(self, model, batch: dict, eval_mode: bool = False) -> tuple[Any, Any]: ...


@dataclass
class StepInfo:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    grad_norm: float | None


@dataclass
class EvalInfo:
    step: int
    loss: float
    ppl: float
    best: bool


@dataclass
class Callbacks:
    on_step: Callable[[StepInfo], None] | None = None
    on_eval: Callable[[EvalInfo], None] | None = None
    on_save: Callable[[Path], None] | None = None
    on_data: Callable[[str, ReadSummary], None] | None = None  # ("train" | "held-out", what reading did)


@dataclass
class Data:
    cache: TokenCache
    train: np.ndarray  # (N, 3) windows
    val: np.ndarray  # (M, 3) windows, may be empty
    pad_id: int
    val_cache: TokenCache | None = None  # held-out files of their own (--val-data); else `cache`


@dataclass
class RunResult:
    steps: int
    total_steps: int
    last: Path
    best: Path | None
    best_val_loss: float | None
    final_train_loss: float | None
    stopped: str  # "done", "early stopping" or "session limit"


def run(
    model,
    objective: Objective,
    data: Data,
    cfg: TrainConfig,
    *,
    tokenizer_file: Path,
    fingerprint: dict,
    accelerator,
    callbacks: Callbacks | None = None,
    resume_dir: Path | None = None,
) -> RunResult:
    """Train ``model`` (already on CPU, not yet prepared) and return where its checkpoints are."""
    import torch

    cb = callbacks or Callbacks()
    acc = accelerator
    sampler = EpochSampler(len(data.train), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
    sampler.check()
    steps_per_epoch = sampler.batches_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrainError(
            f"an epoch has {sampler.batches_per_epoch} micro-batch(es), fewer than --grad-accum {cfg.grad_accum}"
        )
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    fingerprint = {**fingerprint, "world_size": acc.num_processes, "total_steps": total}

    deepspeed = _configure_deepspeed(acc, cfg)
    if cfg.grad_checkpointing:  # transformers 5 renamed it; older versions have only the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
    model, optimizer = acc.prepare(model, optimizer)

    step, best, bad_evals = 0, math.inf, 0
    if resume_dir is not None:
        saved = load_training_state(resume_dir)
        check_fingerprint(saved["fingerprint"], fingerprint, resume_dir)
        if deepspeed:  # ZeRO partitions the optimizer state across ranks: Accelerate saved each shard
            acc.load_state(str(resume_dir / DEEPSPEED_STATE))
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if acc.scaler is not None and saved.get("scaler"):
            acc.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"][acc.process_index])
        step, best, bad_evals = int(saved["step"]), float(saved["best_val_loss"]), int(saved["bad_evals"])
        log.info("resumed from %s at step %d of %d", resume_dir, step, total)
    metrics = (
        MetricsLog(cfg.output / METRICS, step if resume_dir is not None else None) if acc.is_main_process else None
    )

    best_dir = cfg.output / "best"
    last_dir = cfg.output / "last"
    has_val = len(data.val) > 0
    session_start, stopped = step, "done"
    last_loss: float | None = None
    t0 = time.perf_counter()
    window_tokens, window_t = 0, time.perf_counter()

    def save_last() -> None:
        rng = _gather(acc, capture_rng())
        shards = None
        if deepspeed:
            shards = cfg.output / f".deepspeed-{step}"
            acc.save_state(str(shards))  # collective: every rank writes its ZeRO partition
        if acc.is_main_process:
            state = {
                "fingerprint": fingerprint,
                "step": step,
                "epoch": step // steps_per_epoch,
                "batch_in_epoch": (step % steps_per_epoch) * cfg.grad_accum,
                "optimizer": None if deepspeed else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": rng,
                "best_val_loss": best,
                "bad_evals": bad_evals,
            }
            info = {"step": step, "total_steps": total, "train_loss": last_loss, "best_val_loss": _finite(best)}
            save_run_checkpoint(
                acc.unwrap_model(model),
                tokenizer_file,
                last_dir,
                info,
                state,
                extra_dirs={DEEPSPEED_STATE: shards} if shards else None,
            )
            if cb.on_save:
                cb.on_save(last_dir)
        acc.wait_for_everyone()

    with _StopOnSigint() as stop:
        while step < total:
            epoch, first = divmod(step, steps_per_epoch)
            rows = [sampler.batch(epoch, first * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
            batches = [collate(data.cache, data.train, r, data.pad_id) for r in rows]
            group_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(model)
                tensors = {k: torch.from_numpy(v).to(acc.device) for k, v in batch.items()}
                with sync:
                    with acc.autocast():
                        part, _ = objective.loss(model, tensors)
                    # DeepSpeed divides by its gradient_accumulation_steps itself: undo that.
                    acc.backward(part / max(1, group_tokens) * (cfg.grad_accum if deepspeed else 1))
                loss_sum += float(part.detach())
            grad_norm = None
            if cfg.max_grad_norm > 0 and not deepspeed:  # DeepSpeed clips (gradient_clipping)
                grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            optimizer.step()
            if not acc.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes

            # One all-reduce per step: the mean loss over ranks and whether any rank got Ctrl-C.
            totals = acc.reduce(
                torch.tensor([loss_sum, group_tokens, float(stop.requested)], dtype=torch.float64, device=acc.device),
                "sum",
            )
            last_loss = float(totals[0] / max(1.0, float(totals[1])))
            stop_requested = bool(totals[2] > 0)
            if not math.isfinite(last_loss):
                raise TrainError(
                    f"the training loss became {last_loss} at step {step}: lower --lr or use another precision"
                )

            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                info = StepInfo(
                    step,
                    total,
                    step // steps_per_epoch,
                    last_loss,
                    scheduler.get_last_lr()[0],
                    window_tokens / max(1e-9, now - window_t),
                    grad_norm,
                )
                window_tokens, window_t = 0, now
                if metrics:
                    metrics.write(
                        step=step,
                        epoch=info.epoch,
                        split="train",
                        loss=info.loss,
                        ppl=_ppl(info.loss),
                        lr=info.lr,
                        tokens_per_s=info.tokens_per_s,
                        grad_norm=grad_norm,
                        elapsed_s=now - t0,
                    )
                if cb.on_step and acc.is_main_process:
                    cb.on_step(info)

            evaluated = False
            if has_val and (step % eval_every == 0 or step == total):
                val = evaluate(model, objective, data, cfg.eval_batch_size or cfg.batch_size, acc)
                improved = val < best
                best, bad_evals = (val, 0) if improved else (best, bad_evals + 1)
                if metrics:
                    metrics.write(
                        step=step,
                        epoch=step // steps_per_epoch,
                        split="val",
                        loss=val,
                        ppl=_ppl(val),
                        elapsed_s=time.perf_counter() - t0,
                    )
                if improved and acc.is_main_process:
                    save_run_checkpoint(
                        acc.unwrap_model(model),
                        tokenizer_file,
                        best_dir,
                        {"step": step, "val_loss": val, "val_ppl": _ppl(val)},
                        None,
                    )
                if cb.on_eval and acc.is_main_process:
                    cb.on_eval(EvalInfo(step, val, _ppl(val), improved))
                evaluated = True
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped = "early stopping"
            if cfg.stop_after_steps and step - session_start >= cfg.stop_after_steps and step < total:
                stopped = "session limit"
            if stop_requested or stopped != "done" or step == total or step % save_every == 0 or evaluated:
                save_last()
            if evaluated or step % save_every == 0:
                window_t = time.perf_counter()  # tokens/s measures training only, not evals and saves
            if stop_requested and step < total:
                raise TrainingInterrupted(
                    f"interrupted at step {step} of {total}; resumable checkpoint saved to {last_dir} "
                    "(continue with --resume)"
                )
            if stopped != "done":
                break
    return RunResult(
        step, total, last_dir, best_dir if (has_val and best_dir.exists()) else None, _finite(best), last_loss, stopped
    )


def _configure_deepspeed(acc, cfg: TrainConfig) -> bool:
    """Under ``accelerate launch --use_deepspeed``: hand DeepSpeed the batch geometry and clipping
    (its engine steps at accumulation boundaries and clips), since no dataloader is prepared."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm
    return True


def evaluate(model, objective: Objective, data: Data, batch_size: int, acc) -> float:
    """Token-weighted mean loss over this run's held-out windows (all ranks together)."""
    import torch

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    with torch.no_grad():
        for rows in eval_batches(data.val, batch_size, acc.process_index, acc.num_processes):
            batch = {
                k: torch.from_numpy(v).to(acc.device)
                for k, v in collate(data.val_cache or data.cache, data.val, rows, data.pad_id).items()
            }
            with acc.autocast():
                loss_sum, count = objective.loss(model, batch, eval_mode=True)
            total += torch.stack([loss_sum.double(), torch.as_tensor(count, dtype=torch.float64, device=acc.device)])
    model.train()
    total = acc.reduce(total, "sum")
    return float(total[0] / max(1.0, float(total[1])))


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorms and embeddings (the usual GPT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _gather(acc, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (RNG states differ per rank), as a list indexed by rank."""
    if acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * acc.num_processes
    dist.all_gather_object(out, obj)
    return out


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class _StopOnSigint:
    """First Ctrl-C (or SIGTERM: cluster preemption, torchrun shutting its workers down): ask the
    loop to stop after the current step. Second: stop now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing the current step and saving a resumable checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
