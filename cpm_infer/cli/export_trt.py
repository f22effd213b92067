"""``cpm export trt``: ONNX artifact -> TensorRT engine artifact (added to the ``export`` group)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli.options import DeviceOpt


def trt(
    onnx_dir: Annotated[Path, typer.Argument(help="ONNX artifact directory (from `cpm export onnx`).")],
    out_dir: Annotated[
        Path, typer.Argument(help="Engine artifact directory to write (refused if it exists, unless --force).")
    ],
    precision: Annotated[
        str,
        typer.Option("--precision", help="auto (from the GPU: fp32 on Pascal, fp16 on Volta and newer), fp16 or fp32."),
    ] = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch (rows) the engine accepts.")] = 8,
    max_input: Annotated[
        int, typer.Option("--max-input", min=1, help="Longest prompt (tokens) of the prefill profile.")
    ] = 512,
    max_total: Annotated[
        int, typer.Option("--max-total", min=2, help="Longest prompt + generated length; KV buffers are sized for it.")
    ] = 1024,
    workspace_gb: Annotated[
        float, typer.Option("--workspace-gb", help="TensorRT builder workspace limit (GiB).")
    ] = 4.0,
    timing_cache: Annotated[
        Path | None,
        typer.Option("--timing-cache", help="Timing cache file to reuse and update (faster rebuilds on the same GPU)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing OUT_DIR (only once the new one is complete).")
    ] = False,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Compare the engine with the ONNX graph on ONNX Runtime.")
    ] = True,
    device: DeviceOpt = "auto",
) -> None:
    """Build a TensorRT engine (prefill + decode profiles) for this GPU, validated against the ONNX graph."""
    from rich.console import Console

    from cpm_infer.devices import resolve_device
    from export.tensorrt.engine_artifact import export_trt

    gpu = resolve_device(device, "trt").index  # an engine is built for (and on) one GPU

    console = Console(stderr=True)
    with console.status("building", spinner="dots") as status:

        def progress(message: str) -> None:
            status.update(f"{message}…")
            console.log(message)

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
    v = result.validation
    if v.get("status") == "passed":
        console.print(
            f"validation passed: max logits diff {v['max_logits_diff']:.2e}, greedy agreement "
            f"{v['greedy_agreement']:.1%}"
        )
    else:
        console.print(f"validation {v.get('status')}: {v.get('reason', '')}")
    size = (result.path / result.manifest.graph_files["model"]).stat().st_size / 2**20
    print(f"wrote {result.path} ({result.manifest.details['precision']} engine, {size:.1f} MiB)", file=sys.stderr)
