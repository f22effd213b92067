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
    out_dir: Annotated[
        Path, typer.Argument(help="Artifact directory to write (refused if it exists, unless --force).")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing OUT_DIR (only once the new one is complete).")
    ] = False,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Half-precision graph for GPUs (LayerNorm/softmax stay float32).")
    ] = False,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Apply onnxruntime transformer fusions (re-validated).")
    ] = False,
    opset: Annotated[int, typer.Option("--opset", min=14, help="ONNX opset.")] = 17,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="int8 (dynamic, per-channel) or int4 (MatMulNBits) weights, CPU; MODEL_DIR may be a float32 artifact.",
        ),
    ] = None,
    gate_file: Annotated[
        Path | None,
        typer.Option(
            "--gate-file", help="Held-out text for the quality gate (default: the demo model's held-out chapter)."
        ),
    ] = None,
    gate_threshold: Annotated[
        float | None,
        typer.Option(
            "--gate-threshold", min=0, help="Allowed relative perplexity increase (default int8 0.02, int4 0.10)."
        ),
    ] = None,
    force_quality: Annotated[
        bool, typer.Option("--force-quality", help="Write the quantized artifact even when it fails the quality gate.")
    ] = False,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size",
            help="Weights per scale, a power of two >= 16 (int8 default 32, as llama.cpp's q8_0; int4 default 128, "
            "32 is closer to float32 and larger).",
        ),
    ] = None,
    per_channel: Annotated[
        bool,
        typer.Option(
            "--per-channel",
            help="int8: one scale per output column, activations quantized per tensor (MatMulInteger): faster "
            "decoding, further from float32 than blocks.",
        ),
    ] = False,
    lm_head: Annotated[
        str | None,
        typer.Option(
            "--lm-head",
            help="float32 keeps the LM head unquantized (closer to float32, more bytes per token); int8 (with "
            "int4) gives it 8-bit blocks of 32; quantized (default) quantizes it like the rest.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Export a GPT-2/CPM checkpoint to ONNX with past key/values, validated against eager PyTorch."""
    from rich.console import Console

    from export.onnx_export import export_onnx
    from export.quantize import QuantizeError, QuantizeOptions

    if (block_size is not None or lm_head is not None or per_channel) and not quantize:
        raise QuantizeError("--block-size, --lm-head and --per-channel apply with --quantize")
    console = Console(stderr=True)
    with console.status("exporting", spinner="dots") as status:

        def progress(message: str) -> None:
            status.update(f"{message}…")
            console.log(message)

        result = export_onnx(
            model_dir,
            out_dir,
            force=force,
            fp16=fp16,
            optimize=optimize,
            opset=opset,
            device=device,
            tokenizer_file=tokenizer,
            threads=threads,
            progress=progress,
            quantize=quantize
            and QuantizeOptions(quantize, gate_file, gate_threshold, force_quality, block_size, lm_head, per_channel),
        )
    print_reports(result.reports, Console())
    if "quantization" in result.manifest.details:
        print_quantization(result.manifest.details["quantization"], Console())
    files = ", ".join(f"{role}: {name}" for role, name in result.manifest.graph_files.items())
    size = sum(p.stat().st_size for p in result.path.iterdir() if p.is_file()) / 2**20
    print(f"wrote {result.path} ({files}; {size:.1f} MiB)", file=sys.stderr)


def print_quantization(details: dict, console) -> None:
    """The scheme and the quality gate's numbers (also stored in the manifest)."""
    from export.quality_gate import GateResult

    gate = GateResult(**details["gate"])
    parts = ", ".join(
        f"{k} {details[k]}"
        for k in (
            "lm_head",
            "lm_head_block_size",
            "embedding",
            "block_size",
            "symmetric",
            "accuracy_level",
            "per_channel",
            "reduce_range",
            "weight_type",
        )
        if k in details
    )
    console.print(f"{details['scheme']} weights ({parts}; {details['weights_mib']} MiB of weights)")
    console.print(gate.summary(), style="green" if gate.passed else "bold red")


def print_reports(reports, console) -> None:
    """Per validated graph, a table of max |ORT - reference| (and its tolerance) per case and step: for the
    raw graph (logits and every present) and through the backend (last-position logits, greedy agreement)."""
    from rich import box
    from rich.table import Table

    for report in reports:
        for via, columns in (("graph", ("present",)), ("backend", ("agreement",))):
            checks = [c for c in report.checks if c.via == via]
            if not checks and via == "backend":
                continue
            title = f"{report.graph} ({report.dtype}) on {report.provider}: {report.status}"
            caption = f"max |ORT - {report.reference}| / tolerance"
            if via == "backend":
                title = f"{report.graph} through its backend (IO binding): {report.status}"
                caption = "last-position logits; agreement = rows with the reference's greedy token"
            table = Table(
                title=title,
                title_justify="left",
                caption=caption,
                caption_justify="left",
                box=box.SIMPLE,
                pad_edge=False,
            )
            for column in ("case", "step", "logits", *columns, "ok"):
                table.add_column(column, no_wrap=True)
            for c in checks:
                extra = f"{c.agreement:.0%}" if via == "backend" else f"{c.present_diff:.1e}/{c.present_tolerance:.0e}"
                table.add_row(
                    c.case,
                    c.step,
                    f"{c.logits_diff:.1e}/{c.logits_tolerance:.0e}",
                    extra,
                    "yes" if c.ok else "[red]NO[/red]",
                )
            console.print(table)
        if report.reason:
            console.print(f"note: {report.reason}")
