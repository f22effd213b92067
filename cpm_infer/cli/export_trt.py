"""``cpm export trt``: ONNX artifact -> TensorRT engine artifact (added to the ``export`` group), and what
both export commands share: the ``--force`` option and the progress spinner."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cpm_infer.cli.options import DeviceOpt

ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing OUT_DIR (only once the new one is complete).")
]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="auto (from the GPU: fp32 on Pascal, fp16 on Volta and newer), fp16 or fp32."),
]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch (rows) the engine accepts.")]
MaxInputOpt = Annotated[int, typer.Option("--max-input", min=1, help="Longest prompt (tokens) of the prefill profile.")]
MaxTotalOpt = Annotated[
    int, typer.Option("--max-total", min=2, help="Longest prompt + generated length; KV buffers are sized for it.")
]
WorkspaceOpt = Annotated[float, typer.Option("--workspace-gb", help="TensorRT builder workspace limit (GiB).")]
TimingCacheOpt = Annotated[
    Path | None,
    typer.Option("--timing-cache", help="Timing cache file to reuse and update (faster rebuilds on the same GPU)."),
]
ValidateOpt = Annotated[
    bool, typer.Option("--validate/--no-validate", help="Compare the engine with the ONNX graph on ONNX Runtime.")
]


@contextmanager
def progress_spinner(label: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr showing the latest step (``label`` until the first); every step is also logged there.
    Yields the ``progress`` callback the exporters take."""
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(label, spinner="dots") as status:

        def progress(message: str) -> None:
            status.update(f"{message}…")
            console.log(message)

        yield progress


def trt(
    onnx_dir: Annotated[Path, typer.Argument(help="ONNX artifact directory (from `cpm export onnx`).")],
    out_dir: Annotated[
        Path, typer.Argument(help="Engine artifact directory to write (refused if it exists, unless --force).")
    ],
    precision: PrecisionOpt = "auto",
    max_batch: MaxBatchOpt = 8,
    max_input: MaxInputOpt = 512,
    max_total: MaxTotalOpt = 1024,
    workspace_gb: WorkspaceOpt = 4.0,
    timing_cache: TimingCacheOpt = None,
    force: ForceOpt = False,
    validate: ValidateOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Build a TensorRT engine (prefill + decode profiles) for this GPU, validated against the ONNX graph."""
    from cpm_infer.devices import resolve_device
    from export.tensorrt.engine_artifact import export_trt

    gpu = resolve_device(device, "trt").index  # an engine is built for (and on) one GPU
    with progress_spinner("building") as progress:
        result = export_trt(
            onnx_dir,
            out_dir,
            precision=precision,
            max_batch=max_batch,
            max_input=max_input,
            max_total=max_total,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            force=force,
            validate=validate,
            device=gpu,
            progress=progress,
        )
    print_validation(result.validation)
    size = (result.path / result.manifest.graph_files["model"]).stat().st_size / 2**20
    print(f"wrote {result.path} ({result.manifest.details['precision']} engine, {size:.1f} MiB)", file=sys.stderr)


def print_validation(validation: dict[str, Any]) -> None:
    """The engine's validation verdict (on stderr), as ``validation.json`` holds it."""
    from rich.console import Console

    console = Console(stderr=True)
    if validation.get("status") == "passed":
        console.print(
            f"validation passed: max logits diff {validation['max_logits_diff']:.2e}, greedy agreement "
            f"{validation['greedy_agreement']:.1%}"
        )
    else:
        console.print(f"validation {validation.get('status')}: {validation.get('reason', '')}")
