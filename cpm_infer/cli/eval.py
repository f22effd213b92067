"""``cpm eval``: perplexity over a text file and zero-shot candidate scoring, on any backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli.options import BackendOpt, DeviceOpt, ThreadsOpt, TokenizerOpt

app = typer.Typer(
    help="Evaluate a model: perplexity (ppl) and zero-shot candidate scoring (score).", no_args_is_help=True
)

ModelArg = Annotated[Path, typer.Argument(help="Checkpoint directory or exported artifact.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")]


def _open(model: Path, backend: str, device: str, tokenizer: Path | None, threads: int | None):
    from cpm_infer.backends import detect_backend, load_backend

    name = detect_backend(model) if backend == "auto" else backend
    loaded, tok = load_backend(name, model, device=device, tokenizer_file=tokenizer, threads=threads)
    return name, loaded, tok


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@app.command("ppl")
def ppl(
    model: ModelArg,
    file: Annotated[
        Path,
        typer.Argument(help="UTF-8 text (documents separated by blank lines) or JSONL (text, or title + content)."),
    ],
    window: Annotated[
        int | None, typer.Option("--window", min=2, help="Tokens per window (default: the model's context).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", min=1, help="Window step for long documents (default: window / 2).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Equal-length windows scored together.")] = 1,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse a file with parts that would be skipped, naming file:line.")
    ] = False,
    encoding: Annotated[
        str | None, typer.Option("--encoding", help="Encoding of FILE (default: UTF-8, GB18030/GBK detected).")
    ] = None,
) -> None:
    """Perplexity (and scoring speed) of MODEL over FILE, with sliding windows over long documents."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cpm_infer.eval import load_documents, perplexity

    documents, summary = load_documents(file, strict=strict, encoding=encoding)  # fails before the model loads
    console = Console(stderr=True)
    if summary.skipped or summary.replaced or set(summary.encodings) - {"utf-8"}:
        console.print(f"{file}: {summary.describe()}", style="yellow", highlight=False, soft_wrap=True)
    with console.status("loading model", spinner="dots"):
        name, loaded, tok = _open(model, backend, device, tokenizer, threads)
    columns = (
        TextColumn("scoring"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        result = perplexity(
            loaded,
            tok,
            documents,
            window=window,
            stride=stride,
            batch_size=batch_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(
        f"perplexity {result.perplexity:.3f} (mean loss {result.mean_nll:.4f} nats) over {result.tokens} "
        f"tokens of {file.name}: "
        f"{result.documents} document(s), {result.windows} window(s) of {result.window}, stride {result.stride}; "
        f"{name} backend, {result.tokens_per_s:.0f} tokens/s ({result.seconds:.1f} s)"
    )
    _write_json(
        json_out,
        {"model": str(model), "backend": name, "file": str(file), **result.to_dict(), "data": summary.to_dict()},
    )


@app.command("score")
def score(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(help='JSONL examples: {"text": ..., "candidates": [...], "label": ...}.')],
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Prompt with {candidate} and example fields, e.g. '这是关于{candidate}的文章：{text}'. "
            "Default '{text}{candidate}'.",
        ),
    ] = None,
    scope: Annotated[
        str,
        typer.Option(
            "--scope",
            help="Loss over all tokens of the filled template (all, CPM paper) or from the candidate on (candidate).",
        ),
    ] = "all",
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Zero-shot classification: each candidate filled into the template, lowest mean loss wins."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from cpm_infer.eval import read_examples, score_examples
    from cpm_infer.eval.zero_shot import SCOPES, EvalError

    if scope not in SCOPES:
        raise EvalError(f"unknown --scope {scope!r}; use one of {', '.join(SCOPES)}")
    examples = read_examples(file)
    with Console(stderr=True).status("loading model", spinner="dots"):
        name, loaded, tok = _open(model, backend, device, tokenizer, threads)
    result = score_examples(loaded, tok, examples, template=template, scope=scope)
    table = Table(
        box=box.SIMPLE, pad_edge=False, caption=f"mean loss per token (nats), scope {scope}", caption_justify="left"
    )
    for column in ("example", "prediction", "label", "losses"):
        table.add_column(column)
    for example, s in zip(examples, result.scores, strict=True):
        label = "-" if s.label is None else example.candidates[s.label] + (" ✓" if s.correct else " ✗")
        losses = "  ".join(f"{c} {loss:.3f}" for c, loss in zip(example.candidates, s.losses, strict=True))
        table.add_row(s.where.rsplit(":", 1)[-1], example.candidates[s.predicted], label, losses)
    console = Console()
    console.print(table)
    if result.accuracy is not None:
        labelled = sum(s.label is not None for s in result.scores)
        console.print(
            f"accuracy {result.accuracy:.1%} ({sum(bool(s.correct) for s in result.scores)}/{labelled}), {name} backend"
        )
    _write_json(
        json_out, {"model": str(model), "backend": name, "file": str(file), "template": template, **result.to_dict()}
    )
