"""Option aliases shared by commands (one definition of each flag, reused everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.settings import DRAFT_TOKENS_HELP, MAX_DRAFT_TOKENS

ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Checkpoint directory or exported artifact (default: the bundled demo model)."),
]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto (from the model directory), torch, ort or trt.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (the GPU when the backend in use has one), cpu, cuda or cuda:N.")
]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="SentencePiece file, if the model directory has none.")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for the runtime.")]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="RAY_ADDRESS",
        show_envvar=True,
        help="Ray cluster to join (host:port of its head, or 'auto'); default: start one on this machine.",
    ),
]
TruncateOpt = Annotated[
    bool, typer.Option("--truncate", help="Keep the last tokens of prompts that are too long (for the backend).")
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Speculative decoding while one sequence runs: a draft model directory with the model's vocabulary "
        "(its int4 artifact, a distilled student) or 'ngram' (prompt lookup, no model).",
    ),
]
DraftTokensOpt = Annotated[int, typer.Option("--draft-tokens", min=1, max=MAX_DRAFT_TOKENS, help=DRAFT_TOKENS_HELP)]
