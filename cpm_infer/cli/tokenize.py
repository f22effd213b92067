"""``cpm tokenize``: show the exact CPM token ids of text, for debugging data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.errors import CpmError


def tokenize(
    text: Annotated[str | None, typer.Argument(help="Text to tokenize (or use --input).")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Model or artifact directory holding the tokenizer.")
    ] = None,
    vocab: Annotated[Path | None, typer.Option("--vocab", help="A SentencePiece .model file.")] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", "-i", help='Text lines, or JSONL with a "text" field per line.')
    ] = None,
    pieces: Annotated[bool, typer.Option("--pieces", help="Also show the SentencePiece pieces.")] = False,
) -> None:
    """Print one JSON line per text: ids, decoded text (and pieces)."""
    from cpm_infer.cli._common import resolve_model
    from cpm_infer.text import clean
    from cpm_infer.tokenizer import CpmTokenizer

    if (text is None) == (input_file is None):
        raise CpmError("give a TEXT argument or --input FILE (not both)")
    tok = CpmTokenizer(vocab) if vocab else CpmTokenizer.from_dir(resolve_model(model))
    texts = [clean(text, "TEXT")] if text is not None else list(_read_texts(input_file))
    for line, ids in zip(texts, tok.encode_batch(texts), strict=True):
        record = {"text": line, "ids": ids, "decoded": tok.decode(ids)}
        if pieces:
            record["pieces"] = [tok.id_to_piece(i) for i in ids]
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_texts(path: Path):
    from cpm_infer.text import clean, read_text_file

    if not path.is_file():
        raise CpmError(f"input file not found: {path}")
    source = read_text_file(path)
    if source.binary:
        raise CpmError(f"{path} is a binary file, not text")
    for number, line in enumerate(source.lines, 1):
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CpmError(f'{path}:{number}: expected a JSON object with a "text" string') from exc
            if not isinstance(value, str):
                raise CpmError(f'{path}:{number}: expected a JSON object with a "text" string')
            yield clean(value, f"{path}:{number}")
        else:
            yield line
