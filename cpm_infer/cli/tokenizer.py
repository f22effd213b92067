"""``cpm tokenizer train``: a CPM-style SentencePiece model for from-scratch models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Build tokenizers.", no_args_is_help=True)


@app.command("train")
def train(
    data: Annotated[list[Path], typer.Argument(help="Data files or directories (any `cpm train` format).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="SentencePiece model file to write (e.g. spiece.model).")
    ],
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=16, help="Pieces, specials included.")] = 8000,
    data_format: Annotated[str, typer.Option("--format", help="auto, seed, jsonl or text.")] = "auto",
    model_type: Annotated[str, typer.Option("--model-type", help="unigram (as CPM) or bpe.")] = "unigram",
    character_coverage: Annotated[float, typer.Option("--character-coverage", help="CPM used 0.9995.")] = 0.9995,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Train SentencePiece with CPM's pre-processing (jieba cut, space -> ▂, newline -> ▃) and its
    special pieces (<unk> 0, control <sep> <pad> <mask>, <eod>), loadable by CpmTokenizer."""
    from cpm_infer.errors import CpmError
    from cpm_infer.tokenizer import CpmTokenizer
    from trainer.sp_train import train_tokenizer

    if output.exists() and not force:
        raise CpmError(f"{output} exists; pass --force to replace it")
    train_tokenizer(
        data,
        output,
        vocab_size=vocab_size,
        data_format=data_format,
        model_type=model_type,
        character_coverage=character_coverage,
    )
    tok = CpmTokenizer(output)
    print(
        f"wrote {output}: {tok.vocab_size} pieces (<unk> {tok.unk_id}, <sep> {tok.sep_id}, <pad> {tok.pad_id}, "
        f"<eod> {tok.eod_id})",
        file=sys.stderr,
    )
