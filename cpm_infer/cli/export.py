"""``cpm export``: checkpoints -> self-contained runtime artifacts (ONNX now; TensorRT adds ``trt``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli import export_trt
from cpm_infer.cli.options import DeviceOpt, ThreadsOpt, TokenizerOpt

app = typer.Typer(help="Export models to ONNX / TensorRT artifacts.", no_args_is_help=True)
app.command("trt")(export_trt.trt)


@app.command("onnx")
def onnx(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + weights + tokenizer).")],
    out_dir: Annotated[Path, typer.Argument(help="Artifact directory to write (refused if it exists, unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT_DIR (only once the new one is complete).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision graph for GPUs (LayerNorm/softmax stay float32).")] = False,
    optimize: Annotated[bool, typer.Option("--optimize", help="Apply onnxruntime transformer fusions (re-validated).")] = False,
    opset: Annotated[int, typer.Option("--opset", min=14, help="ONNX opset.")] = 17,
    device: DeviceOpt = "cpu",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Export a GPT-2/CPM checkpoint to ONNX with past key/values, validated against eager PyTorch."""
    from rich.console import Console  # noqa: PLC0415

    from export.onnx_export import export_onnx  # noqa: PLC0415 - imports torch: only when the command runs

    console = Console(stderr=True)
    with console.status("exporting", spinner="dots") as status:

        def progress(message: str) -> None:
            status.update(f"{message}…")
            console.log(message)

        result = export_onnx(
            model_dir, out_dir, force=force, fp16=fp16, optimize=optimize, opset=opset, device=device,
            tokenizer_file=tokenizer, threads=threads, progress=progress,
        )
    print_reports(result.reports, Console())
    files = ", ".join(f"{role}: {name}" for role, name in result.manifest.graph_files.items())
    size = sum(p.stat().st_size for p in result.path.iterdir() if p.is_file()) / 2**20
    print(f"wrote {result.path} ({files}; {size:.1f} MiB)", file=sys.stderr)


def print_reports(reports, console) -> None:
    """One rich table per validated graph: max |ORT - eager| (and its tolerance) per case and step."""
    from rich import box  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    for report in reports:
        title = f"{report.graph} ({report.dtype}) on {report.provider}: {report.status}"
        table = Table(title=title, title_justify="left", caption="max |ORT - eager| / tolerance", caption_justify="left",
                      box=box.SIMPLE, pad_edge=False)
        for column in ("case", "step", "logits", "present", "ok"):
            table.add_column(column, no_wrap=True)
        for c in report.checks:
            table.add_row(c.case, c.step, f"{c.logits_diff:.1e}/{c.logits_tolerance:.0e}",
                          f"{c.present_diff:.1e}/{c.present_tolerance:.0e}", "yes" if c.ok else "[red]NO[/red]")
        console.print(table)
        if report.reason:
            console.print(f"note: {report.reason}")
