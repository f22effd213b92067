"""``cpm info``: what a checkpoint or artifact holds, and whether its parts fit together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cpm_infer.cli.options import TokenizerOpt

if TYPE_CHECKING:
    from rich.table import Table

    from cpm_infer.config import ModelSpec
    from cpm_infer.tokenizer import CpmTokenizer


def info(
    model: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory or artifact (default: the demo model).")
    ] = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Show the model spec, parameter count, weights and the tokenizer/embedding check."""
    from rich.console import Console
    from rich.table import Table

    from cpm_infer.artifact import MANIFEST
    from cpm_infer.cli._common import resolve_model

    path = resolve_model(model)
    table = Table(show_header=False, box=None)
    if (path / MANIFEST).is_file():
        _artifact_rows(table, path, tokenizer)
    else:
        _checkpoint_rows(table, path, tokenizer)
    Console().print(table)


def _checkpoint_rows(table: Table, path: Path, tokenizer: Path | None) -> None:
    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.tokenizer import CpmTokenizer

    ckpt = open_checkpoint(path, tokenizer)
    tok = CpmTokenizer(ckpt.tokenizer_file)
    size = sum(p.stat().st_size for p in ckpt.weight_files)
    table.add_row("checkpoint", str(ckpt.directory))
    _spec_rows(table, ckpt.spec)
    table.add_row("weights", f"{ckpt.format}, {len(ckpt.weight_files)} file(s), {size / 2**20:.1f} MiB")
    _tokenizer_rows(table, tok, ckpt.tokenizer_file, ckpt.spec, ckpt.directory)
    eos = ckpt.config.get("eos_token_id")
    if eos is not None and eos != tok.eod_id:
        table.add_row("note", f"config.json says eos_token_id {eos}; generation stops at <eod> ({tok.eod_id}) instead")


def _artifact_rows(table: Table, path: Path, tokenizer: Path | None) -> None:
    """Through the manifest reader: a malformed manifest, or one naming missing files, is a one-line error."""
    from cpm_infer.artifact import MANIFEST, read_json, read_manifest
    from cpm_infer.tokenizer import CpmTokenizer

    manifest = read_manifest(path)
    tokenizer_file = tokenizer or path / manifest.tokenizer_file
    tok = CpmTokenizer(tokenizer_file)
    table.add_row("artifact", f"{manifest.format} (schema {manifest.schema_version}, {path / MANIFEST})")
    _spec_rows(table, manifest.spec)
    table.add_row("dtype", f"{manifest.dtype} (weights and KV cache; logits float32)")
    for role, name in manifest.graph_files.items():
        table.add_row(f"file: {role}", f"{name} ({(path / name).stat().st_size / 2**20:.1f} MiB)")
    _tokenizer_rows(table, tok, tokenizer_file, manifest.spec, path)
    table.add_row("source weights", f"sha256 {manifest.source_sha256}")
    table.add_row("tools", ", ".join(f"{k} {v}" for k, v in manifest.tools.items()) or "-")
    if manifest.generation:
        table.add_row("generation", _value(manifest.generation))
    if manifest.validation_report:
        report = path / manifest.validation_report
        status = _validation_status(read_json(report)) if report.is_file() else "missing"
        table.add_row("validation", f"{status} ({manifest.validation_report})")
    for key, value in manifest.details.items():
        table.add_row(key, _value(value))


def _spec_rows(table: Table, spec: ModelSpec) -> None:
    table.add_row(
        "shape", f"{spec.n_layer} layers, {spec.n_head} heads, {spec.n_embd} hidden, head_dim {spec.head_dim}"
    )
    table.add_row("context", str(spec.n_positions))
    table.add_row("parameters", f"{spec.parameter_count():,} (tied LM head)")


def _tokenizer_rows(table: Table, tok: CpmTokenizer, file: Path, spec: ModelSpec, where: Path) -> None:
    from cpm_infer.checkpoint import check_tokenizer_fits

    table.add_row("tokenizer", f"{file} ({tok.vocab_size} pieces)")
    check_tokenizer_fits(tok.vocab_size, spec, where, file)
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


def _validation_status(report: Any) -> str:
    """``status`` of a report (a TensorRT engine's) or of each graph's (an ONNX artifact's list)."""
    rows = report if isinstance(report, list) else [report]
    statuses = [f"{row.get('graph', '')}: {row.get('status')}".lstrip(": ") for row in rows if isinstance(row, dict)]
    return ", ".join(statuses) or "unreadable"


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
