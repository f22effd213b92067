"""``cpm info``: what a checkpoint or artifact holds, and whether its parts fit together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli.options import TokenizerOpt


def info(
    model: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory or artifact (default: the demo model).")
    ] = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Show the model spec, parameter count, weights and the tokenizer/embedding check."""
    from rich.console import Console
    from rich.table import Table

    from cpm_infer.backends import MANIFEST
    from cpm_infer.checkpoint import check_tokenizer_fits, open_checkpoint
    from cpm_infer.cli._common import resolve_model
    from cpm_infer.tokenizer import CpmTokenizer

    path = resolve_model(model)
    table = Table(show_header=False, box=None)
    manifest = path / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        table.add_row("artifact", f"{data.get('format')} ({manifest})")
        for key, value in data.items():
            if key != "format":
                table.add_row(
                    key, json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
                )
        Console().print(table)
        return
    ckpt = open_checkpoint(path, tokenizer)
    tok = CpmTokenizer(ckpt.tokenizer_file)
    spec = ckpt.spec
    size = sum(p.stat().st_size for p in ckpt.weight_files)
    table.add_row("checkpoint", str(ckpt.directory))
    table.add_row(
        "shape", f"{spec.n_layer} layers, {spec.n_head} heads, {spec.n_embd} hidden, head_dim {spec.head_dim}"
    )
    table.add_row("context", str(spec.n_positions))
    table.add_row("parameters", f"{spec.parameter_count():,} (tied LM head)")
    table.add_row("weights", f"{ckpt.format}, {len(ckpt.weight_files)} file(s), {size / 2**20:.1f} MiB")
    table.add_row("tokenizer", f"{ckpt.tokenizer_file} ({tok.vocab_size} pieces)")
    check_tokenizer_fits(tok.vocab_size, spec, ckpt.directory)
    fit = (
        "ok"
        if tok.vocab_size == spec.vocab_size
        else f"ok ({spec.vocab_size - tok.vocab_size} embedding rows unused, never generated)"
    )
    table.add_row("embedding", f"{spec.vocab_size} rows: {fit}")
    table.add_row(
        "special ids",
        f"<eod> {tok.eod_id} (end of document, stops generation), <sep> {tok.sep_id}, <pad> {tok.pad_id}, "
        f"<unk> {tok.unk_id}",
    )
    eos = ckpt.config.get("eos_token_id")
    if eos is not None and eos != tok.eod_id:
        table.add_row("note", f"config.json says eos_token_id {eos}; generation stops at <eod> ({tok.eod_id}) instead")
    Console().print(table)
