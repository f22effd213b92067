"""``cpm train finetune`` / ``cpm train distill``: thin adapters over ``trainer`` with a progress bar.

Both commands take the same run options (data, output, batch geometry, schedule, cadence, precision,
resume...). They are declared once, as the signature of :func:`_run_options`; :func:`_takes_run_options`
adds them to each command's signature, where Typer reads them, and the command collects them in ``**run``.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cpm_infer.errors import CpmError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

app = typer.Typer(help="Fine-tune or distil CPM models (HF checkpoints out; resumable).", no_args_is_help=True)

DataArg = Annotated[
    list[Path],
    typer.Argument(help="Data files or directories: seed-format files, JSONL (title/content or text), plain text."),
]
OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Run directory: best/, last/ (resumable), metrics.csv.")
]
ValDataOpt = Annotated[
    list[Path] | None, typer.Option("--val-data", help="Held-out data (repeatable); default: a split of the data.")
]
FormatOpt = Annotated[str, typer.Option("--format", help="auto, seed, jsonl or text.")]
ValFractionOpt = Annotated[
    float, typer.Option("--val-fraction", help="Share of documents held out when no --val-data.")
]
MaxLenOpt = Annotated[
    int | None, typer.Option("--max-len", help="Window length in tokens (default: min(512, context)).")
]
StrideOpt = Annotated[int | None, typer.Option("--stride", help="Tokens between window starts (default: --max-len).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Windows per micro-batch (per process).")]
EvalBatchOpt = Annotated[int | None, typer.Option("--eval-batch-size", min=1)]
AccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")]
WdOpt = Annotated[float, typer.Option("--weight-decay")]
WarmupOpt = Annotated[int, typer.Option("--warmup-steps", min=0)]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="linear, cosine or constant (after warmup).")]
MinLrOpt = Annotated[float, typer.Option("--min-lr-ratio", help="Final lr as a fraction of the peak.")]
ClipOpt = Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0 = off).")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1)]
StepsOpt = Annotated[int, typer.Option("--max-steps", min=0, help="Optimizer steps (overrides --epochs).")]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", min=0, help="Steps between evaluations (0 = each epoch).")]
SaveEveryOpt = Annotated[
    int, typer.Option("--save-every", min=0, help="Steps between saves of last/ (0 = at evaluations).")
]
LogEveryOpt = Annotated[int, typer.Option("--log-every", min=1, help="Steps between metrics rows.")]
PatienceOpt = Annotated[
    int, typer.Option("--patience", min=0, help="Stop after so many evaluations without improvement (0 = off).")
]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.")
]
CkptOpt = Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations to save memory.")]
SeedOpt = Annotated[int, typer.Option("--seed")]
CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Preprocessing cache (default: $CPM_CACHE_DIR or ~/.cache/cpm-infer)."),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --output exactly where last/ left it.")]
StopAfterOpt = Annotated[
    int,
    typer.Option(
        "--stop-after-steps", min=0, help="End this session after so many steps, resumable (job time limits)."
    ),
]
CpuOpt = Annotated[bool, typer.Option("--cpu", help="Train on CPU even where CUDA is available.")]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict", help="Refuse data that would be skipped (empty, binary, title without body...), naming file:line."
    ),
]
EncodingOpt = Annotated[
    str | None,
    typer.Option("--encoding", help="Encoding of the data files (default: UTF-8, with GB18030/GBK files detected)."),
]


def _run_options(
    data: DataArg,
    output: OutputOpt,
    val_data: ValDataOpt = None,
    data_format: FormatOpt = "auto",
    val_fraction: ValFractionOpt = 0.05,
    max_len: MaxLenOpt = None,
    stride: StrideOpt = None,
    batch_size: BatchOpt = 8,
    eval_batch_size: EvalBatchOpt = None,
    grad_accum: AccumOpt = 1,
    lr: LrOpt = 1e-4,
    weight_decay: WdOpt = 0.01,
    warmup_steps: WarmupOpt = 100,
    schedule: ScheduleOpt = "linear",
    min_lr_ratio: MinLrOpt = 0.0,
    max_grad_norm: ClipOpt = 1.0,
    epochs: EpochsOpt = 1,
    max_steps: StepsOpt = 0,
    eval_every: EvalEveryOpt = 0,
    save_every: SaveEveryOpt = 0,
    log_every: LogEveryOpt = 10,
    patience: PatienceOpt = 0,
    precision: PrecisionOpt = "auto",
    grad_checkpointing: CkptOpt = False,
    seed: SeedOpt = 42,
    cache_dir: CacheOpt = None,
    resume: ResumeOpt = False,
    stop_after_steps: StopAfterOpt = 0,
    cpu: CpuOpt = False,
    strict: StrictOpt = False,
    encoding: EncodingOpt = None,
) -> dict[str, Any]:
    """The options every training command takes, declared once, as ``TrainConfig`` keyword arguments
    (each option is named after the field it sets)."""
    options = dict(locals())
    options["val_data"] = val_data or []
    return options


def _takes_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the shared run options to the signature Typer reads from ``command`` (which collects them
    in ``**run``): the data argument and --output first, the command's own options next, the rest
    after (the order --help lists them in)."""
    shared = _keyword_parameters(_run_options)
    command.__signature__ = inspect.Signature([*shared[:2], *_keyword_parameters(command), *shared[2:]])
    return command


def _keyword_parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    """``function``'s named parameters, keyword-only (Typer passes all by name, so a required option
    may follow optional ones) and with their annotations evaluated (this module defers them)."""
    parameters = inspect.signature(function, eval_str=True).parameters.values()
    return [p.replace(kind=p.KEYWORD_ONLY) for p in parameters if p.kind is not p.VAR_KEYWORD]


def _train_config(run: dict[str, Any]) -> TrainConfig:
    from trainer.config import TrainConfig

    return TrainConfig(**_run_options(**run))


@app.command("finetune")
@_takes_run_options
def finetune(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Checkpoint to fine-tune.")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="Tokenizer file (required for a new model).")
    ] = None,
    layers: Annotated[int, typer.Option("--layers", min=1, help="New model (no --model): layers.")] = 4,
    heads: Annotated[int, typer.Option("--heads", min=1, help="New model: attention heads.")] = 4,
    hidden: Annotated[int, typer.Option("--hidden", min=1, help="New model: hidden size.")] = 256,
    context: Annotated[int, typer.Option("--context", min=2, help="New model: positions.")] = 512,
    dropout: Annotated[float, typer.Option("--dropout", help="New model: dropout.")] = 0.1,
    **run: Any,
) -> None:
    """Fine-tune a checkpoint (--model) or train a new model (--tokenizer + shape) on your text."""
    from cpm_infer.config import ModelSpec
    from trainer.finetune import finetune as run_finetune

    cfg = _train_config(run)
    new_spec = new_config = None
    if model is None:
        if tokenizer is None:
            raise CpmError("give --model to fine-tune a checkpoint, or --tokenizer (and a shape) to train a new model")
        from cpm_infer.tokenizer import CpmTokenizer

        new_spec = ModelSpec(
            n_layer=layers,
            n_head=heads,
            n_embd=hidden,
            vocab_size=CpmTokenizer(tokenizer).vocab_size,
            n_positions=context,
        )
        new_config = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    _train(run_finetune, cfg, model_dir=model, new_spec=new_spec, tokenizer_file=tokenizer, new_config=new_config)


@app.command("distill")
@_takes_run_options
def distill(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="Teacher checkpoint.")],
    student_layers: Annotated[
        int | None, typer.Option("--student-layers", min=1, help="Student depth (default: half the teacher's).")
    ] = None,
    layer_map: Annotated[
        str | None, typer.Option("--layer-map", help="Teacher layers that initialise the student, e.g. 0,5,11.")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="KD softmax temperature.")] = 2.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the KD loss (the LM loss gets 1 - alpha).")] = 0.5,
    **run: Any,
) -> None:
    """Distil a teacher into a shallower student initialised from teacher layers (KD + LM loss)."""
    from trainer.distill import distill as run_distill

    cfg = _train_config(run)
    mapping = None
    if layer_map:
        try:
            mapping = [int(x) for x in layer_map.split(",")]
        except ValueError as exc:
            raise CpmError(f"--layer-map takes comma-separated layer numbers, got {layer_map!r}") from exc
    _train(
        run_distill,
        cfg,
        teacher_dir=teacher,
        student_layers=student_layers,
        layer_map=mapping,
        temperature=temperature,
        alpha=alpha,
    )


def _train(train: Callable[..., Any], cfg: TrainConfig, **options: Any) -> None:
    """``train(cfg, **options)`` (a ``trainer`` entry point) with the progress display, then its outcome
    printed; an interrupted run becomes the CLI's ``Interrupted`` (exit code 130)."""
    from cpm_infer.errors import Interrupted
    from trainer.errors import TrainingInterrupted

    with _Display() as display:
        try:
            result = train(cfg, callbacks=display.callbacks(), progress=display.data_progress, **options)
        except TrainingInterrupted as exc:
            raise Interrupted(str(exc)) from exc
    _report(result)


def _report(result) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    best = (
        f"; best: {result.best} (held-out loss {result.best_val_loss:.4f})"
        if result.best and result.best_val_loss is not None
        else ""
    )
    how = (
        ""
        if result.stopped == "done"
        else f" ({result.stopped}; continue with --resume)"
        if result.stopped == "session limit"
        else f" ({result.stopped})"
    )
    print(f"trained {result.steps}/{result.total_steps} steps{how}; last: {result.last}{best}", file=sys.stderr)


class _Display:
    """A rich progress bar on the main process (rank 0); silent elsewhere."""

    def __init__(self) -> None:
        self.enabled = int(os.environ.get("RANK", "0")) == 0
        self.progress = None
        self.task = self.data_task = None

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def data_progress(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.data_task is None:
            self.data_task = self.progress.add_task("tokenizing", total=total, status="documents")
        self.progress.update(self.data_task, completed=done, total=total)

    def callbacks(self):
        from trainer.loop import Callbacks

        if self.progress is None:
            return None
        return Callbacks(on_step=self._step, on_eval=self._eval, on_data=self._data)

    def _data(self, label: str, summary) -> None:
        style = "yellow" if summary.skipped or summary.replaced else None
        self.progress.console.print(f"{label} data: {summary.describe()}", style=style, highlight=False, soft_wrap=True)

    def _step(self, info) -> None:
        if self.task is None:
            self.task = self.progress.add_task("training", total=info.total_steps, status="")
        status = f"loss {info.loss:.4f}  lr {info.lr:.2e}  {info.tokens_per_s:,.0f} tok/s"
        self.progress.update(self.task, completed=info.step, total=info.total_steps, status=status)

    def _eval(self, info) -> None:
        mark = "  (best)" if info.best else ""
        self.progress.console.print(f"step {info.step}: held-out loss {info.loss:.4f}, perplexity {info.ppl:.2f}{mark}")
