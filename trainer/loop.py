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
    model, objective: Objective, data: Data, cfg: TrainConfig, *, resume_dir: Path | None = None, **session
) -> RunResult:
    """Train ``model`` (already on CPU, not yet prepared) and return where its checkpoints are. ``session``:
    :class:`TrainingRun`'s keyword arguments (tokenizer_file, fingerprint, accelerator, callbacks)."""
    training = TrainingRun(model, objective, data, cfg, **session)
    if resume_dir is not None:
        training.resume(resume_dir)
    return training.train()


class TrainingRun:
    """One session of a training run with its state explicit: the step counter, the prepared model,
    optimizer and scheduler, the best held-out loss and the evaluations since it improved (all saved
    in ``last`` and restored by :meth:`resume`), plus this session's last loss, stop reason and
    throughput window. :meth:`train` runs the steps; each step's parts are methods of their own."""

    def __init__(
        self,
        model,
        objective: Objective,
        data: Data,
        cfg: TrainConfig,
        *,
        tokenizer_file: Path,
        fingerprint: dict,
        accelerator,
        callbacks: Callbacks | None = None,
    ) -> None:
        self.objective, self.data, self.cfg, self.acc = objective, data, cfg, accelerator
        self.tokenizer_file = tokenizer_file
        self.callbacks = callbacks or Callbacks()
        self._plan_steps()
        self.fingerprint = {**fingerprint, "world_size": accelerator.num_processes, "total_steps": self.total}
        self.deepspeed = _configure_deepspeed(accelerator, cfg)
        self.model, self.optimizer, self.scheduler = self._prepare(model)
        self.last_dir, self.best_dir = cfg.output / "last", cfg.output / "best"
        self.has_val = len(data.val) > 0
        # What `last` saves and a resume restores.
        self.step, self.best, self.bad_evals = 0, math.inf, 0
        self.resumed = False
        # This session only.
        self.session_start = 0
        self.stopped = "done"  # or "early stopping", "session limit"
        self.interrupt = _StopOnSigint()  # installed while train() runs; its flag is checked between steps
        self.last_loss: float | None = None
        self.metrics: MetricsLog | None = None
        self.t0 = self.window_t = time.perf_counter()
        self.window_tokens = 0  # tokens trained since window_t, all ranks

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _plan_steps(self) -> None:
        """The run's geometry: optimizer steps per epoch and in all, and how often to evaluate and save."""
        cfg, acc = self.cfg, self.acc
        self.sampler = EpochSampler(
            len(self.data.train), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes
        )
        self.sampler.check()
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"an epoch has {self.sampler.batches_per_epoch} micro-batch(es), "
                f"fewer than --grad-accum {cfg.grad_accum}"
            )
        self.total = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.save_every = cfg.save_every or self.eval_every

    def _prepare(self, model) -> tuple[Any, Any, Any]:
        """(model, optimizer, scheduler), the first two prepared by Accelerate (DDP or DeepSpeed wrapping)."""
        import torch

        cfg = self.cfg
        if cfg.grad_checkpointing:  # transformers 5 renamed it; older versions have only the old name
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.train()
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, self.total, cfg.min_lr_ratio)
        model, optimizer = self.acc.prepare(model, optimizer)
        return model, optimizer, scheduler

    def resume(self, directory: Path) -> None:
        """Continue from the training state in ``directory`` (a ``last`` of this same run)."""
        acc = self.acc
        saved = load_training_state(directory)
        check_fingerprint(saved["fingerprint"], self.fingerprint, directory)
        if self.deepspeed:  # ZeRO partitions the optimizer state across ranks: Accelerate saved each shard
            acc.load_state(str(directory / DEEPSPEED_STATE))
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if acc.scaler is not None and saved.get("scaler"):
            acc.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"][acc.process_index])
        self.step = int(saved["step"])
        self.best, self.bad_evals = float(saved["best_val_loss"]), int(saved["bad_evals"])
        self.resumed = True
        log.info("resumed from %s at step %d of %d", directory, self.step, self.total)

    def train(self) -> RunResult:
        """Step until done, early stopping or the session limit. Ctrl-C (or SIGTERM) finishes the step in
        flight, saves ``last`` and raises :class:`TrainingInterrupted`."""
        if self.acc.is_main_process:
            self.metrics = MetricsLog(self.cfg.output / METRICS, self.step if self.resumed else None)
        self.session_start = self.step
        self.t0 = self.window_t = time.perf_counter()
        with self.interrupt:
            while self.step < self.total:
                if self._advance():
                    break
        best = self.best_dir if (self.has_val and self.best_dir.exists()) else None
        return RunResult(self.step, self.total, self.last_dir, best, _finite(self.best), self.last_loss, self.stopped)

    def _advance(self) -> bool:
        """One optimizer step and what is due after it; True when this session should end."""
        loss_sum, group_tokens, grad_norm = self._optimizer_step()
        stop_requested = self._agree(loss_sum, group_tokens, self.interrupt.requested)
        if self.step % self.cfg.log_every == 0 or self.step == self.total:
            self._report(grad_norm)
        evaluated = self.has_val and (self.step % self.eval_every == 0 or self.step == self.total)
        if evaluated:
            self._evaluate()
        limit = self.cfg.stop_after_steps
        if limit and self.step - self.session_start >= limit and self.step < self.total:
            self.stopped = "session limit"
        due = self.step == self.total or self.step % self.save_every == 0 or evaluated
        if stop_requested or self.stopped != "done" or due:
            self._save_last()
        if evaluated or self.step % self.save_every == 0:
            self.window_t = time.perf_counter()  # tokens/s measures training only, not evals and saves
        self._stop_if_interrupted(stop_requested)
        return self.stopped != "done"

    def _optimizer_step(self) -> tuple[float, int, float | None]:
        """Accumulate gradients over ``grad_accum`` micro-batches and step the optimizer and scheduler.
        Returns this rank's summed loss, its labelled-token count and the gradient norm (when clipped here)."""
        cfg, acc = self.cfg, self.acc
        first = (self.step % self.steps_per_epoch) * cfg.grad_accum
        rows = [self.sampler.batch(self.epoch, first + i) for i in range(cfg.grad_accum)]
        batches = [collate(self.data.cache, self.data.train, r, self.data.pad_id) for r in rows]
        group_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_sum = self._backward(batches, group_tokens)
        grad_norm = None
        if cfg.max_grad_norm > 0 and not self.deepspeed:  # DeepSpeed clips (gradient_clipping)
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_tokens += sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes
        return loss_sum, group_tokens, grad_norm

    def _backward(self, batches: list[dict], group_tokens: int) -> float:
        """Forward and backward over the micro-batches, gradients synchronised across ranks only on the
        last one; the loss is normalised by the step's token count, so accumulation equals one big batch."""
        import torch

        acc, loss_sum = self.acc, 0.0
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(self.model)
            tensors = {k: torch.from_numpy(v).to(acc.device) for k, v in batch.items()}
            with sync:
                with acc.autocast():
                    part, _ = self.objective.loss(self.model, tensors)
                # DeepSpeed divides by its gradient_accumulation_steps itself: undo that.
                acc.backward(part / max(1, group_tokens) * (self.cfg.grad_accum if self.deepspeed else 1))
            loss_sum += float(part.detach())
        return loss_sum

    def _agree(self, loss_sum: float, group_tokens: int, requested: bool) -> bool:
        """One all-reduce per step: the mean loss over ranks (kept as ``last_loss``) and whether any rank
        got Ctrl-C (returned), so that all ranks stop at the same step."""
        import torch

        acc = self.acc
        totals = acc.reduce(
            torch.tensor([loss_sum, group_tokens, float(requested)], dtype=torch.float64, device=acc.device), "sum"
        )
        self.last_loss = float(totals[0] / max(1.0, float(totals[1])))
        if not math.isfinite(self.last_loss):
            raise TrainError(
                f"the training loss became {self.last_loss} at step {self.step}: lower --lr or use another precision"
            )
        return bool(totals[2] > 0)

    def _report(self, grad_norm: float | None) -> None:
        """A train row in metrics.csv and ``on_step``: loss, lr and throughput since the last report."""
        now = time.perf_counter()
        info = StepInfo(
            self.step,
            self.total,
            self.epoch,
            self.last_loss,
            self.scheduler.get_last_lr()[0],
            self.window_tokens / max(1e-9, now - self.window_t),
            grad_norm,
        )
        self.window_tokens, self.window_t = 0, now
        self._record("train", info.loss, now, lr=info.lr, tokens_per_s=info.tokens_per_s, grad_norm=grad_norm)
        if self.callbacks.on_step and self.acc.is_main_process:
            self.callbacks.on_step(info)

    def _evaluate(self) -> None:
        """Held-out loss; a new best is saved to ``best``; too many evaluations without one stop the run
        (``--patience``)."""
        cfg, acc = self.cfg, self.acc
        val = evaluate(self.model, self.objective, self.data, cfg.eval_batch_size or cfg.batch_size, acc)
        improved = val < self.best
        self.best, self.bad_evals = (val, 0) if improved else (self.best, self.bad_evals + 1)
        self._record("val", val, time.perf_counter())
        if improved and acc.is_main_process:
            info = {"step": self.step, "val_loss": val, "val_ppl": _ppl(val)}
            save_run_checkpoint(acc.unwrap_model(self.model), self.tokenizer_file, self.best_dir, info, None)
        if self.callbacks.on_eval and acc.is_main_process:
            self.callbacks.on_eval(EvalInfo(self.step, val, _ppl(val), improved))
        if cfg.patience and self.bad_evals >= cfg.patience:
            self.stopped = "early stopping"

    def _record(self, split: str, loss: float, now: float, **extra: Any) -> None:
        """A metrics.csv row (main process only)."""
        if self.metrics:
            self.metrics.write(
                step=self.step,
                epoch=self.epoch,
                split=split,
                loss=loss,
                ppl=_ppl(loss),
                elapsed_s=now - self.t0,
                **extra,
            )

    def _save_last(self) -> None:
        """Write the resumable ``last`` checkpoint (a collective call: every rank must make it)."""
        acc = self.acc
        rng = _gather(acc, capture_rng())
        shards = None
        if self.deepspeed:
            shards = self.cfg.output / f".deepspeed-{self.step}"
            acc.save_state(str(shards))  # collective: every rank writes its ZeRO partition
        if acc.is_main_process:
            info = {
                "step": self.step,
                "total_steps": self.total,
                "train_loss": self.last_loss,
                "best_val_loss": _finite(self.best),
            }
            save_run_checkpoint(
                acc.unwrap_model(self.model),
                self.tokenizer_file,
                self.last_dir,
                info,
                self._training_state(rng),
                extra_dirs={DEEPSPEED_STATE: shards} if shards else None,
            )
            if self.callbacks.on_save:
                self.callbacks.on_save(self.last_dir)
        acc.wait_for_everyone()

    def _training_state(self, rng: list[Any]) -> dict[str, Any]:
        """What :meth:`resume` restores (``rng``: every rank's generator states)."""
        acc, cfg = self.acc, self.cfg
        return {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": (self.step % self.steps_per_epoch) * cfg.grad_accum,
            "optimizer": None if self.deepspeed else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": rng,
            "best_val_loss": self.best,
            "bad_evals": self.bad_evals,
        }

    def _stop_if_interrupted(self, requested: bool) -> None:
        """After a Ctrl-C on any rank (and the save of ``last`` it forces): end the session with the way back."""
        if not requested or self.step >= self.total:
            return  # an interrupt during the final step lets the run finish normally
        raise TrainingInterrupted(
            f"interrupted at step {self.step} of {self.total}; resumable checkpoint saved to {self.last_dir} "
            "(continue with --resume)"
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
