"""``cpm export``: checkpoints -> self-contained runtime artifacts (ONNX now; TensorRT adds ``trt``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cpm_infer.cli import export_trt
from cpm_infer.cli.export_trt import ForceOpt, progress_spinner
from cpm_infer.cli.options import DeviceOpt, ThreadsOpt, TokenizerOpt

if TYPE_CHECKING:
    from export.quantize import QuantizeOptions

app = typer.Typer(help="Export models to ONNX / TensorRT artifacts.", no_args_is_help=True)
app.command("trt")(export_trt.trt)

ModelDirArg = Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + weights + tokenizer).")]
OutDirArg = Annotated[Path, typer.Argument(help="Artifact directory to write (refused if it exists, unless --force).")]
Fp16Opt = Annotated[
    bool, typer.Option("--fp16", help="Half-precision graph for GPUs (LayerNorm/softmax stay float32).")
]
OptimizeOpt = Annotated[bool, typer.Option("--optimize", help="Apply onnxruntime transformer fusions (re-validated).")]
OpsetOpt = Annotated[int, typer.Option("--opset", min=14, help="ONNX opset.")]

# --quantize and the options that refine it (collected into export.quantize.QuantizeOptions).
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="int8 (8-bit k-quant blocks of 64, the LM head in q8_0's symmetric blocks of 32) or int4 (4-bit blocks; "
        "the LM head and the first block 8-bit, the embedding float32) weight-only MatMulNBits for the CPU; MODEL_DIR "
        "may be a float32 artifact.",
    ),
]
GateFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--gate-file", help="Held-out text for the quality gate (default: the demo model's held-out chapter)."
    ),
]
GateThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--gate-threshold", min=0, help="Allowed relative perplexity increase (default int8 0.02, int4 0.10)."
    ),
]
ForceQualityOpt = Annotated[
    bool, typer.Option("--force-quality", help="Write the quantized artifact even when it fails the quality gate.")
]
BlockSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--block-size",
        help="Weights per scale, a power of two >= 16 (int8's body default 64; int4's 4-bit blocks default 128, 32 is "
        "closer to float32 and larger).",
    ),
]
PerChannelOpt = Annotated[
    bool,
    typer.Option(
        "--per-channel",
        help="int8: one scale per output column, activations quantized per tensor (MatMulInteger): faster "
        "decoding, further from float32 than blocks.",
    ),
]
LmHeadOpt = Annotated[
    str | None,
    typer.Option(
        "--lm-head",
        help="float32 keeps the LM head unquantized (closer to float32, more bytes per token); int8 (the default) "
        "gives it symmetric 8-bit blocks (int8: of 32, int4: of 128); quantized quantizes it like the rest (with "
        "int4: 4-bit, faster, further from float32).",
    ),
]
FastOpt = Annotated[
    bool,
    typer.Option(
        "--fast",
        help="int4: the former default recipe, every matrix 4-bit (blocks of 128, no zero points) and a 4-bit "
        "embedding: faster decoding and a smaller artifact, further from float32 (about 47x the default's "
        "next-token KL on the demo model).",
    ),
]
Int8MatricesOpt = Annotated[
    str | None,
    typer.Option(
        "--int8-matrices",
        help="int4: block matrices kept at 8 bits, comma-separated: a type (attn.c_attn, attn.c_proj, mlp.c_fc, "
        "mlp.c_proj), h.N (layer N) or h.N.TYPE; none for no 8-bit matrices (default h.0).",
    ),
]
GateKlOpt = Annotated[
    float | None,
    typer.Option(
        "--gate-kl-threshold",
        min=0,
        help="Allowed mean next-token KL from the float32 graph, nats (default int8 0.0198, int4 0.0953: "
        "log 1.02 and log 1.10, the perplexity limits' counterparts).",
    ),
]


@app.command("onnx")
def onnx(
    model_dir: ModelDirArg,
    out_dir: OutDirArg,
    force: ForceOpt = False,
    fp16: Fp16Opt = False,
    optimize: OptimizeOpt = False,
    opset: OpsetOpt = 17,
    quantize: QuantizeOpt = None,
    gate_file: GateFileOpt = None,
    gate_threshold: GateThresholdOpt = None,
    force_quality: ForceQualityOpt = False,
    block_size: BlockSizeOpt = None,
    per_channel: PerChannelOpt = False,
    lm_head: LmHeadOpt = None,
    fast: FastOpt = False,
    int8_matrices: Int8MatricesOpt = None,
    gate_kl_threshold: GateKlOpt = None,
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Export a GPT-2/CPM checkpoint to ONNX with past key/values, validated against eager PyTorch."""
    from rich.console import Console

    from export.onnx_export import export_onnx

    options = quantize_options(
        quantize,
        gate_file,
        gate_threshold,
        force_quality,
        block_size,
        lm_head,
        per_channel,
        fast=fast,
        int8_matrices=int8_matrices,
        gate_kl_threshold=gate_kl_threshold,
    )
    with progress_spinner("exporting") as progress:
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
            quantize=options,
        )
    print_reports(result.reports, Console())
    if "quantization" in result.manifest.details:
        print_quantization(result.manifest.details["quantization"], Console())
    files = ", ".join(f"{role}: {name}" for role, name in result.manifest.graph_files.items())
    size = sum(p.stat().st_size for p in result.path.iterdir() if p.is_file()) / 2**20
    print(f"wrote {result.path} ({files}; {size:.1f} MiB)", file=sys.stderr)


def quantize_options(
    scheme: str | None,
    gate_file: Path | None,
    gate_threshold: float | None,
    force_quality: bool,
    block_size: int | None,
    lm_head: str | None,
    per_channel: bool,
    *,
    fast: bool = False,
    int8_matrices: str | None = None,
    gate_kl_threshold: float | None = None,
) -> QuantizeOptions | None:
    """The ``--quantize`` request (None without it); its refining options alone are refused."""
    from export.quantize import QuantizeError, QuantizeOptions

    refining = (block_size, lm_head, int8_matrices, gate_kl_threshold)
    if (any(v is not None for v in refining) or per_channel or fast) and not scheme:
        raise QuantizeError(
            "--block-size, --lm-head, --per-channel, --fast, --int8-matrices and --gate-kl-threshold apply with "
            "--quantize"
        )
    if scheme is None:
        return None
    matrices = None if int8_matrices is None else tuple(m.strip() for m in int8_matrices.split(",") if m.strip())
    return QuantizeOptions(
        scheme,
        gate_file,
        gate_threshold,
        force_quality,
        block_size,
        lm_head,
        per_channel,
        fast=fast,
        int8_matrices=() if matrices == ("none",) else matrices,
        gate_kl_threshold=gate_kl_threshold,
    )


def print_quantization(details: dict, console) -> None:
    """The scheme and the quality gate's numbers (also stored in the manifest)."""
    from export.quality_gate import GateResult

    gate = GateResult(**details["gate"])
    parts = ", ".join(
        f"{k} {details[k]}"
        for k in (
            "recipe",
            "lm_head",
            "lm_head_block_size",
            "embedding",
            "block_size",
            "symmetric",
            "algorithm",
            "int8_matrices",
            "int8_block_size",
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
