"""``cpm model create``: a randomly initialised CPM-shaped checkpoint (for tests and benchmarks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.errors import CpmError

app = typer.Typer(help="Create model checkpoints.", no_args_is_help=True)


@app.command("create")
def create(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (must not exist unless --force).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="CPM SentencePiece file to ship with the model.")],
    preset: Annotated[str | None, typer.Option("--preset", help="small, medium or large (CPM shapes).")] = None,
    layers: Annotated[int, typer.Option("--layers", min=1)] = 2,
    heads: Annotated[int, typer.Option("--heads", min=1)] = 4,
    hidden: Annotated[int, typer.Option("--hidden", min=1)] = 64,
    context: Annotated[int, typer.Option("--context", min=2)] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing directory.")] = False,
) -> None:
    """Write a random GPT-2 with CPM's layout (HF format) that every command accepts."""
    from cpm_infer.config import ModelSpec
    from cpm_infer.config import preset as get_preset
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import random_model, save_checkpoint

    if out_dir.exists() and not force:
        raise CpmError(f"{out_dir} exists; pass --force to replace it")
    tok = CpmTokenizer(tokenizer)
    if preset:
        spec = get_preset(preset)
        if tok.vocab_size > spec.vocab_size:
            raise CpmError(f"tokenizer has {tok.vocab_size} pieces, more than the {preset} preset's {spec.vocab_size}")
    else:
        spec = ModelSpec(n_layer=layers, n_head=heads, n_embd=hidden, vocab_size=tok.vocab_size, n_positions=context)
    model = random_model(spec, seed=seed, eod_id=tok.eod_id, pad_id=tok.pad_id)
    save_checkpoint(model, tokenizer, out_dir)
    print(f"wrote a random {spec.n_layer}-layer/{spec.n_embd}-hidden model to {out_dir}", file=sys.stderr)
