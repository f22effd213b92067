"""``cpm export onnx``: checkpoint -> validated, self-contained ONNX artifact directory.

Steps, all inside a temporary sibling of OUT_DIR that is renamed at the end (an interrupted or
failed export leaves nothing half-written): record the eager transformers reference outputs
(``export.validate``), move the weights into ``export.gpt2.ExportGPT2`` (shared, not copied, for
float32), trace it with the KV contract of ``cpm_infer.kv`` (TorchScript exporter, without its
parameters: ORT's GPT-2 fusions crash on dynamo graphs), write the weights one tensor at a time
into an external data file, free the torch model, validate with ONNX Runtime, optionally apply
ORT's transformer fusions (validated again) and quantize, then give the artifact its final layout
(one file per graph under 2 GB, graph + external data above) and write the tokenizer, the
validation report and the manifest.

Memory: one copy of the weights at a time (the torch model, or one ONNX Runtime session), plus the
tensor being written; graph rewrites load the protobuf without its weights (``export.onnx_weights``).
A failed validation keeps its report next to OUT_DIR (``OUT_DIR.validation-failed.json``).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cpm_infer import kv, torch_model
from cpm_infer.artifact import Manifest, tool_versions, write_manifest
from cpm_infer.atomic import staged_dir
from cpm_infer.checkpoint import Checkpoint, open_checkpoint
from cpm_infer.config import GenerationConfig, ModelSpec
from cpm_infer.deps import require
from cpm_infer.devices import AUTO, resolve_for_all
from cpm_infer.tokenizer import CpmTokenizer
from export.onnx_artifact import PROTOBUF_LIMIT, TOOLS, ExportError, ExportResult, Progress
from export.onnx_weights import (
    ExternalDataWriter,
    finish_layout,
    load_graph,
    release_memory,
    save_graph,
    weight_bytes,
)
from export.optimize import optimize_graph
from export.quantize import QuantizeOptions, apply_quantization, check_request
from export.quantize_artifact import quantize_artifact
from export.reference import Reference, record_eager
from export.validate import (
    ValidationReport,
    failed_report_path,
    raise_for_failures,
    validate_onnx_graph,
    write_report,
)

if TYPE_CHECKING:
    from export.gpt2 import ExportGPT2

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
OPTIMIZED_GRAPH = "model_optimized.onnx"
TOKENIZER = "spiece.model"
REPORT = "validation.json"
# The exported graph's revision, in each manifest's details: bumped whenever the same weights and options export to a
# different graph (fusions, operators, quantized layout), so tools that reuse artifacts (the benchmarks) can tell an
# artifact of older code. 2: the CPU graph without SkipLayerNormalization, attention reading packed Q|K|V.
GRAPH_FORMAT = 2
DEFAULT_OPSET = 17


def current_graph(details: dict) -> bool:
    """Whether a manifest's ``details`` were written by this code's exporter (``GRAPH_FORMAT``)."""
    return details.get("graph_format") == GRAPH_FORMAT


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
        if device == AUTO:
            device = "cpu"  # the int8/int4 kernels are the CPU provider's
        check_request(model_dir, quantize, fp16=fp16, device=device)
        if (Path(model_dir) / "manifest.json").is_file():
            return quantize_artifact(model_dir, out_dir, quantize, force=force, threads=threads, progress=say)
    out = Path(out_dir)
    _check_request(out, force=force, opset=opset)
    device = str(resolve_for_all(device, ("torch", "ort")))  # export on torch, validate on onnxruntime
    dtype = "float16" if fp16 else "float32"

    ckpt = open_checkpoint(model_dir, tokenizer_file)  # bad input fails here, before any progress output
    module, tokenizer, reference = _load(ckpt, fp16, device, say)
    source_sha256 = ckpt.weights_sha256()

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        say(f"exporting {dtype} graph (opset {opset})")
        graph_files = {"model": GRAPH}
        _export_graph(module, tmp, opset, device)
        del module
        release_memory()  # the torch weights are gone before ONNX Runtime maps the graph's

        checks = _Validation(tmp, out, reference, ckpt.spec, dtype, device, threads, say)
        checks.run(GRAPH)
        fusions = _optimize(checks, graph_files) if optimize else {}
        quantization = None
        if quantize is not None:
            graph_files, quantization = apply_quantization(
                tmp, graph_files, ckpt.spec, tokenizer, quantize, threads=threads, say=say
            )
        graph_files = finish_layout(tmp, graph_files, external_data_threshold)

        say("writing artifact")
        shutil.copyfile(ckpt.tokenizer_file, tmp / TOKENIZER)
        write_report(checks.reports, tmp / REPORT)
        details = _details(ckpt, tokenizer, opset, checks.reports, fusions, quantization)
        manifest = _manifest(ckpt, dtype, graph_files, source_sha256, details)
        write_manifest(tmp, manifest)
    failed_report_path(out).unlink(missing_ok=True)  # a report of an earlier failed export of OUT_DIR
    return ExportResult(out, manifest, checks.reports)


def _check_request(out: Path, *, force: bool, opset: int) -> None:
    """What can be refused before the checkpoint is read: a missing runtime, OUT_DIR, the opset."""
    for module in ("torch", "onnx", "onnxruntime"):
        require(module, "export")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    if opset < 14:
        raise ExportError(f"opset {opset} is too old; use 14 or newer (default {DEFAULT_OPSET})")


def _load(ckpt: Checkpoint, fp16: bool, device: str, say: Progress) -> tuple[ExportGPT2, CpmTokenizer, Reference]:
    """The export module (holding the weights), the tokenizer and the eager reference.

    The transformers model is gone when this returns: the export module took its weights over (float32:
    the same tensors; float16: converted one by one)."""
    import torch

    from export.gpt2 import ExportGPT2

    say(f"loading {ckpt.spec.n_layer}-layer model from {ckpt.directory}")
    model, tokenizer = torch_model.load_model(ckpt, device=device)
    say(f"recording the eager PyTorch reference on {device}")
    reference = record_eager(model, ckpt.spec)
    module = ExportGPT2.from_hf(model, torch.float16 if fp16 else torch.float32, take=True)
    return module, tokenizer, reference


@dataclass
class _Validation:
    """Validates the graphs of the export in progress in ``tmp`` against the eager reference, keeping the
    reports; the first failure raises (its report kept next to ``out``)."""

    tmp: Path
    out: Path
    reference: Reference
    spec: ModelSpec
    dtype: str
    device: str
    threads: int | None
    say: Progress
    reports: list[ValidationReport] = field(default_factory=list)

    def run(self, graph: str, *, kv_shared: bool = False) -> None:
        self.say(f"validating {graph} against eager PyTorch on {self.device}")
        report = validate_onnx_graph(
            self.tmp / graph,
            self.reference,
            self.spec,
            self.dtype,
            kv_shared=kv_shared,
            device=self.device,
            threads=self.threads,
        )
        self.reports.append(report)
        raise_for_failures(self.reports, self.out)


def _optimize(checks: _Validation, graph_files: dict[str, str]) -> dict[str, int]:
    """ORT's transformer fusions into ``OPTIMIZED_GRAPH``, validated; it becomes the model, the plain graph
    the portable one. Returns the fusions applied."""
    checks.say("applying onnxruntime transformer fusions")
    fusions = optimize_graph(
        checks.tmp / GRAPH,
        checks.tmp / OPTIMIZED_GRAPH,
        checks.spec,
        use_gpu=checks.device.startswith("cuda"),
        dtype=checks.dtype,
    )
    checks.run(OPTIMIZED_GRAPH, kv_shared=bool(fusions.get("GroupQueryAttention")))
    graph_files.update(model=OPTIMIZED_GRAPH, portable=GRAPH)
    return fusions


def _details(
    ckpt: Checkpoint,
    tokenizer: CpmTokenizer,
    opset: int,
    reports: list[ValidationReport],
    fusions: dict[str, int],
    quantization: dict | None,
) -> dict:
    """The manifest's ``details`` of an ONNX artifact."""
    return {
        "opset": opset,
        "graph_format": GRAPH_FORMAT,
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
    }


def _manifest(ckpt: Checkpoint, dtype: str, graph_files: dict[str, str], source_sha256: str, details: dict) -> Manifest:
    return Manifest(
        format="onnx",
        spec=ckpt.spec,
        dtype=dtype,
        graph_files=graph_files,
        tokenizer_file=TOKENIZER,
        source_sha256=source_sha256,
        tools=tool_versions(TOOLS),
        generation=GenerationConfig().to_dict(),
        validation_report=REPORT,
        details=details,
        inputs=kv.graph_input_names(ckpt.spec.n_layer),
        dynamic_axes=kv.dynamic_axes(ckpt.spec.n_layer, keep=True),
    )


def _export_graph(module, tmp: Path, opset: int, device: str) -> None:
    """Trace ``module`` into ``tmp/model.onnx`` with its weights in ``tmp/model.onnx.data``.

    The TorchScript exporter would serialise every parameter into one in-memory protobuf (a second
    copy of the model); traced with ``export_params=False`` the parameters become graph inputs
    named after them, which are then turned into initializers written straight from the torch
    tensors, one at a time (``export.onnx_weights``)."""
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
            (ids, mask, pos, *pasts, torch.ones(1, dtype=torch.int64, device=device)),  # keep: see kv
            str(raw / GRAPH),
            input_names=kv.graph_input_names(n),
            output_names=kv.output_names(n),
            dynamic_axes=kv.dynamic_axes(n, keep=True),
            opset_version=opset,
            do_constant_folding=True,
            export_params=False,
            dynamo=False,
        )
    proto = load_graph(raw / GRAPH)
    shutil.rmtree(raw)
    contract = set(kv.graph_input_names(n))
    params = dict(module.named_parameters())
    weights = [value.name for value in proto.graph.input if value.name not in contract]
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise ExportError(f"the traced graph reads {unknown[:3]}, which are not parameters of the export module")
    with ExternalDataWriter(tmp / f"{GRAPH}.data") as writer:
        for name in weights:  # identical tensors were merged by the exporter: only the names it kept
            proto.graph.initializer.append(writer.add(name, params[name].detach().cpu().numpy()))
    kept = [value for value in proto.graph.input if value.name in contract]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    save_graph(proto, tmp / GRAPH)
    onnx.checker.check_model(str(tmp / GRAPH))
    log.info("exported %s (%.1f MiB of weights, external data)", GRAPH, weight_bytes(proto) / 2**20)
