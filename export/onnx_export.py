"""``cpm export onnx``: checkpoint -> validated, self-contained ONNX artifact directory.

Steps, all inside a temporary sibling of OUT_DIR that is renamed at the end (an interrupted or
failed export leaves nothing half-written): trace ``export.gpt2.ExportGPT2`` with the KV contract
of ``cpm_infer.kv`` (TorchScript exporter: ORT's GPT-2 fusions crash on dynamo graphs), store the
weights as external data when the graph is over 2 GB, validate with ONNX Runtime against eager
transformers, optionally apply ORT's transformer fusions (validated again), then write the tokenizer,
the validation report and the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpm_infer import kv
from cpm_infer.artifact import Manifest, tool_versions, write_manifest
from cpm_infer.atomic import staged_dir
from cpm_infer.config import GenerationConfig
from cpm_infer.deps import require
from cpm_infer.devices import AUTO, resolve_for_all
from cpm_infer.errors import CpmError
from export.quantize import QuantizeOptions
from export.validate import EagerReference, ValidationReport, validate_graph, write_report

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
OPTIMIZED_GRAPH = "model_optimized.onnx"
TOKENIZER = "spiece.model"
REPORT = "validation.json"
DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB
TOOLS = ("cpm-infer", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")

Progress = Callable[[str], None]


class ExportError(CpmError):
    """The export cannot start or cannot finish (nothing is written)."""


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    reports: list[ValidationReport]


def export_onnx(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    fp16: bool = False,
    optimize: bool = False,
    opset: int = DEFAULT_OPSET,
    device: str = "cpu",
    tokenizer_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT,
    progress: Progress | None = None,
    quantize: QuantizeOptions | None = None,
) -> ExportResult:
    """Export, validate (always), optionally optimize and quantize (with its quality gate), and
    atomically write the artifact. ``quantize`` on a float32 ONNX artifact quantizes that instead."""
    say = progress or (lambda message: log.info("%s", message))
    if quantize is not None:
        from export.quantize import check_request

        if device == AUTO:
            device = "cpu"  # the int8/int4 kernels are the CPU provider's
        check_request(model_dir, quantize, fp16=fp16, device=device)
        if (Path(model_dir) / "manifest.json").is_file():
            from export.quantize_artifact import quantize_artifact

            return quantize_artifact(model_dir, out_dir, quantize, force=force, threads=threads, progress=say)
    torch = require("torch", "export")
    require("onnx", "export")
    require("onnxruntime", "export")
    from cpm_infer.backends.ort_backend import create_session
    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.torch_model import load_model
    from export.gpt2 import ExportGPT2

    out = Path(out_dir)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    if opset < 14:
        raise ExportError(f"opset {opset} is too old; use 14 or newer (default {DEFAULT_OPSET})")
    device = str(resolve_for_all(device, ("torch", "ort")))  # export on torch, validate on onnxruntime
    dtype = "float16" if fp16 else "float32"

    ckpt = open_checkpoint(model_dir, tokenizer_file)  # bad input fails here, before any progress output
    say(f"loading {ckpt.spec.n_layer}-layer model from {ckpt.directory}")
    model, tokenizer = load_model(ckpt, device=device)
    module = ExportGPT2.from_hf(model, torch.float16 if fp16 else torch.float32).to(device)

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        say(f"exporting {dtype} graph (opset {opset})")
        graph_files = {"model": GRAPH}
        external = _export_graph(module, tmp, opset, device, external_data_threshold)
        if external:
            graph_files["weights"] = external

        reports = []
        reference = EagerReference(model)
        say(f"validating {GRAPH} against eager PyTorch on {device}")
        reports.append(_validate(create_session, tmp / GRAPH, reference, ckpt.spec, dtype, device, threads))
        if optimize:
            from export.optimize import optimize_graph

            say("applying onnxruntime transformer fusions")
            fusions = optimize_graph(
                tmp / GRAPH,
                tmp / OPTIMIZED_GRAPH,
                ckpt.spec,
                use_gpu=device.startswith("cuda"),
                dtype=dtype,
                external_data_threshold=external_data_threshold,
            )
            say(f"validating {OPTIMIZED_GRAPH} against eager PyTorch on {device}")
            reports.append(
                _validate(create_session, tmp / OPTIMIZED_GRAPH, reference, ckpt.spec, dtype, device, threads)
            )
            graph_files.update(model=OPTIMIZED_GRAPH, portable=GRAPH)
            if (tmp / f"{OPTIMIZED_GRAPH}.data").is_file():
                graph_files["optimized_weights"] = f"{OPTIMIZED_GRAPH}.data"
        else:
            fusions = {}
        quantization = None
        if quantize is not None:
            from export.quantize import apply_quantization

            graph_files, quantization = apply_quantization(
                tmp, graph_files, ckpt.spec, tokenizer, quantize, threads=threads, say=say
            )

        say("writing artifact")
        shutil.copyfile(ckpt.tokenizer_file, tmp / TOKENIZER)
        write_report(reports, tmp / REPORT)
        manifest = Manifest(
            format="onnx",
            spec=ckpt.spec,
            dtype=dtype,
            graph_files=graph_files,
            tokenizer_file=TOKENIZER,
            source_sha256=ckpt.weights_sha256(),
            tools=tool_versions(TOOLS),
            generation=GenerationConfig().to_dict(),
            validation_report=REPORT,
            details={
                "opset": opset,
                "exporter": "torch.onnx TorchScript (dynamo=False), module export.gpt2.ExportGPT2",
                "source": str(ckpt.directory.resolve()),
                "special_ids": {
                    "eod": tokenizer.eod_id,
                    "pad": tokenizer.pad_id,
                    "sep": tokenizer.sep_id,
                    "unk": tokenizer.unk_id,
                },
                "validation": {r.graph: r.status for r in reports},
                "fusions": fusions,
                "mask_value": "finite -1e4 via where(); LayerNorm and softmax in float32",
                **({"kv_cache": "shared"} if fusions.get("GroupQueryAttention") else {}),  # see export.kv_share
                **({"quantization": quantization} if quantization else {}),
            },
        )
        write_manifest(tmp, manifest)
    return ExportResult(out, manifest, reports)


def _export_graph(module, tmp: Path, opset: int, device: str, threshold: int) -> str | None:
    """Trace ``module`` into ``tmp/model.onnx``; returns the external-data file name if one is used."""
    import onnx
    import torch

    n = module.n_layer
    batch, seq, past = 2, 3, 2  # distinct from each other and from the head sizes, so no axis is baked in
    ids = torch.ones((batch, seq), dtype=torch.int64, device=device)
    mask = torch.ones((batch, past + seq), dtype=torch.int64, device=device)
    pos = torch.arange(past, past + seq, device=device).repeat(batch, 1)
    pasts = tuple(
        torch.zeros((batch, module.n_head, past, module.head_dim), dtype=module.dtype, device=device)
        for _ in range(2 * n)
    )
    raw = tmp / "_raw"
    raw.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            module,
            (ids, mask, pos, *pasts),
            str(raw / GRAPH),
            input_names=kv.input_names(n),
            output_names=kv.output_names(n),
            dynamic_axes=kv.dynamic_axes(n),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    # Re-save from the scratch dir: one self-contained file, or graph + one external-data file.
    proto = onnx.load(str(raw / GRAPH), load_external_data=True)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = f"{GRAPH}.data" if size >= threshold else None
    onnx.save_model(
        proto,
        str(tmp / GRAPH),
        save_as_external_data=external is not None,
        all_tensors_to_one_file=True,
        location=external,
        size_threshold=1024,
    )
    shutil.rmtree(raw)
    onnx.checker.check_model(str(tmp / GRAPH))
    log.info("exported %s (%.1f MiB of weights%s)", GRAPH, size / 2**20, ", external data" if external else "")
    return external


def _validate(
    create_session, graph: Path, reference, spec, dtype: str, device: str, threads: int | None
) -> ValidationReport:
    """Validate one graph; a half-precision graph the CPU provider cannot load is reported, not hidden."""
    from cpm_infer.backends.ort_backend import OrtLoadError

    try:
        session = create_session(graph, device=device, threads=threads)
    except OrtLoadError as exc:
        if dtype != "float16" or not device.startswith("cpu"):
            raise
        log.warning("fp16 graph not validated on CPU: %s", exc)
        return ValidationReport(
            graph=graph.name,
            dtype=dtype,
            provider="CPUExecutionProvider",
            status="not run",
            reason=f"{exc}; validate it on a GPU with --device cuda",
        )
    report = validate_graph(session, graph.name, reference, spec, dtype)
    report.raise_for_failure()
    if dtype == "float16" and report.provider == "CPUExecutionProvider":
        # ORT's CPU provider lacks fp16 kernels for most ops and inserts float32 casts around them.
        report.reason = (
            "ran on the CPU provider, which computes most float16 ops in float32 (inserted casts): "
            "checks graph, IO types and fp16 storage, not fp16 arithmetic; validate on a GPU with --device cuda"
        )
    return report
