"""``cpm export trt``: ONNX artifact -> validated TensorRT engine artifact.

The engine artifact is a directory like the ONNX one (``cpm_infer.artifact``): ``model.engine``,
the tokenizer, ``validation.json`` and ``manifest.json`` with ``"format": "tensorrt"``. TensorRT
specifics sit in the manifest's ``details``: TensorRT version, GPU name and compute capability (the
load-time compatibility check), precision and build mode, engine limits and profiles, and sha256 of
the source ONNX graph and of the tokenizer file.

Everything that can be checked without TensorRT (arguments, source manifest, profiles, output
directory) is checked first; the build happens in a temporary sibling of OUT_DIR renamed at the end,
so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpm_infer.artifact import Manifest, read_manifest, sha256_files, tool_versions, write_manifest
from cpm_infer.atomic import staged_dir
from cpm_infer.backends.trt import cuda
from cpm_infer.backends.trt.compat import RuntimeInfo, cc_string
from cpm_infer.backends.trt.profiles import EngineLimits, make_profiles
from cpm_infer.deps import require
from cpm_infer.errors import CpmError
from export.reference import record_backend, validation_cases
from export.tensorrt.builder import build_engine
from export.tensorrt.precision import PRECISIONS, BuildPlan, check_trt_supports, parse_version, resolve_build
from export.validate import PRECISION_DTYPES, ValidationReport, failed_report_path, validate_backend

log = logging.getLogger(__name__)

ENGINE = "model.engine"
REPORT = "validation.json"
MAX_PARSER_OPSET_BEFORE_10 = 17  # TensorRT 8.6's ONNX parser reads opsets up to 17
Progress = Callable[[str], None]


class TrtExportError(CpmError):
    """``cpm export trt`` cannot start or cannot finish (nothing is written)."""


@dataclass
class TrtExportResult:
    path: Path
    manifest: Manifest
    precision_reason: str
    validation: dict[str, Any]


def source_graph(onnx_dir: Path, manifest: Manifest) -> tuple[Path, list[Path]]:
    """The graph TensorRT parses: the portable one (ORT-only fusions are not ONNX TensorRT can read)
    and the files whose bytes define it (graph + external weights)."""
    graph = onnx_dir / manifest.graph_files.get("portable", manifest.graph_files["model"])
    files = [graph]
    if "weights" in manifest.graph_files:
        files.append(onnx_dir / manifest.graph_files["weights"])
    return graph, files


def check_request(
    onnx_dir: Path, out_dir: Path, *, precision: str, limits: EngineLimits, workspace_gb: float, force: bool
) -> Manifest:
    """All checks that need neither TensorRT nor a GPU; returns the source manifest."""
    if precision not in PRECISIONS:
        raise TrtExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not workspace_gb > 0:
        raise TrtExportError(f"--workspace-gb must be positive, got {workspace_gb}")
    source = read_manifest(onnx_dir, expected_format="onnx")
    limits.check(source.spec)
    if out_dir.resolve() == onnx_dir.resolve():
        raise TrtExportError("OUT_DIR must differ from ONNX_DIR")
    if out_dir.exists() and not force:
        raise TrtExportError(f"{out_dir} exists; pass --force to replace it")
    return source


def engine_details(
    *,
    here: RuntimeInfo,
    plan: BuildPlan,
    reason: str,
    limits: EngineLimits,
    profiles: list,
    onnx_sha256: str,
    tokenizer_sha256: str,
    source: Manifest,
    workspace_bytes: int,
    fp32_layers: int,
) -> dict[str, Any]:
    return {
        **here.to_details(),
        "precision": plan.precision,
        "precision_reason": reason,
        "build_mode": plan.mode,
        "build_note": plan.note,
        "limits": limits.to_dict(),
        "profiles": [p.to_dict() for p in profiles],
        "onnx_sha256": onnx_sha256,
        "onnx_dtype": source.dtype,
        "onnx_opset": source.details.get("opset"),
        "tokenizer_sha256": tokenizer_sha256,
        "workspace_bytes": workspace_bytes,
        "fp32_layers": fp32_layers,
    }


def export_trt(
    onnx_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "auto",
    max_batch: int = 8,
    max_input: int = 512,
    max_total: int = 1024,
    workspace_gb: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
    force: bool = False,
    validate: bool = True,
    device: int = 0,
    progress: Progress | None = None,
) -> TrtExportResult:
    say = progress or (lambda message: log.info("%s", message))
    src, out = Path(onnx_dir), Path(out_dir)
    limits = EngineLimits(max_batch, max_input, max_total)
    source = check_request(src, out, precision=precision, limits=limits, workspace_gb=workspace_gb, force=force)
    spec = source.spec
    profiles = make_profiles(spec, limits)

    trt = require("tensorrt", "tensorrt")
    here, plan, reason = _select_build(trt, source, precision, device, say)
    target = _Target(here, plan, reason, limits, profiles, workspace_bytes=int(workspace_gb * 2**30))
    graph, graph_files = source_graph(src, source)
    with staged_dir(out) as tmp:
        say(f"building the {plan.precision} engine ({plan.mode}{': ' + plan.note if plan.note else ''}); takes minutes")
        engine, report = build_engine(
            trt,
            graph,
            spec=spec,
            plan=plan,
            profiles=profiles,
            workspace_bytes=target.workspace_bytes,
            timing_cache=Path(timing_cache) if timing_cache else None,
        )
        (tmp / ENGINE).write_bytes(engine)
        tokenizer = src / source.tokenizer_file
        shutil.copyfile(tokenizer, tmp / source.tokenizer_file)
        details = engine_details(
            **vars(target),
            onnx_sha256=sha256_files(graph_files),
            tokenizer_sha256=sha256_files([tokenizer]),
            source=source,
            fp32_layers=len(report.fp32_layers),
        )
        manifest = _engine_manifest(source, target, details)
        write_manifest(tmp, manifest)
        checked = _validate(tmp, src, plan.precision, spec, limits, device, validate, say)
        validation = _write_report(checked, tmp, out)
    failed_report_path(out).unlink(missing_ok=True)
    return TrtExportResult(out, manifest, reason, validation)


@dataclass
class _Target:
    """What an engine is built for and with: this TensorRT and GPU (``here``), the precision plan and why,
    the limits, profiles and workspace. The fields are ``engine_details``' parameters."""

    here: RuntimeInfo
    plan: BuildPlan
    reason: str
    limits: EngineLimits
    profiles: list
    workspace_bytes: int


def _select_build(
    trt: Any, source: Manifest, precision: str, device: int, say: Progress
) -> tuple[RuntimeInfo, BuildPlan, str]:
    """Select GPU ``device``, check that this TensorRT builds for it and reads the source graph, and plan
    the precision."""
    trt_version = parse_version(trt.__version__)
    gpu = cuda.gpu_info(device)
    call = cuda.runtime()
    cuda.call(call.cudaSetDevice(device), f"selecting GPU {device}")
    check_trt_supports(gpu.name, gpu.compute_capability, trt_version)
    plan, reason = resolve_build(precision, gpu.compute_capability, source.dtype, trt_version)
    opset = source.details.get("opset")
    if trt_version[0] < 10 and isinstance(opset, int) and opset > MAX_PARSER_OPSET_BEFORE_10:
        raise TrtExportError(
            f"the ONNX graph uses opset {opset} but TensorRT {trt.__version__} reads opsets up to "
            f"{MAX_PARSER_OPSET_BEFORE_10}; re-export it with --opset 17"
        )
    say(f"{gpu.name} (sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}), TensorRT {trt.__version__}: {reason}")
    return RuntimeInfo(trt.__version__, gpu.name, cc_string(gpu.compute_capability)), plan, reason


def _engine_manifest(source: Manifest, target: _Target, details: dict[str, Any]) -> Manifest:
    """The engine artifact's manifest: the source's model, tokenizer and generation settings."""
    tools = tool_versions(("cpm-infer", "tensorrt", "cuda-python", "cuda-bindings"))
    return Manifest(
        format="tensorrt",
        spec=source.spec,
        dtype=target.plan.kv_dtype,
        graph_files={"model": ENGINE},
        tokenizer_file=source.tokenizer_file,
        source_sha256=source.source_sha256,
        tools={**tools, "tensorrt": target.here.trt_version},
        generation=dict(source.generation),
        validation_report=REPORT,
        details=details,
    )


def _write_report(report: ValidationReport, tmp: Path, out: Path) -> dict[str, Any]:
    """``validation.json`` into the staged artifact; a failed validation's report is also kept next to
    OUT_DIR (the error raised names it). Returns the report's dict."""
    validation = report.to_dict()
    text = json.dumps(validation, indent=2) + "\n"
    (tmp / REPORT).write_text(text, encoding="utf-8")
    if report.status == "failed":
        path = failed_report_path(out)
        path.write_text(text, encoding="utf-8")
        report.raise_for_failure(path)
    return validation


def _validate(
    engine_dir: Path,
    onnx_dir: Path,
    precision: str,
    spec,
    limits: EngineLimits,
    device: int,
    enabled: bool,
    say: Progress,
) -> ValidationReport:
    """The engine against the ONNX artifact on ONNX Runtime (CPU), one model loaded at a time: the
    reference is recorded and freed before the engine is loaded. 'not run' (with the reason) when
    it cannot run here."""
    dtype = PRECISION_DTYPES[precision]

    def not_run(reason: str) -> ValidationReport:
        return ValidationReport(ENGINE, dtype, "TensorRT", "not run", reason, format="tensorrt", reference="")

    if not enabled:
        return not_run("--no-validate")
    try:
        require("onnxruntime", "ort")
    except CpmError as exc:
        return not_run(str(exc))
    from cpm_infer.backends import load_backend

    longest = max(len(p) for _, prompts in validation_cases(spec) for p in prompts)
    if longest > limits.max_input or longest + 3 >= limits.max_total:
        return not_run(f"validation prompts ({longest} tokens) exceed the engine limits")
    say("validating the engine against the ONNX graph on ONNX Runtime (CPU)")
    reference_backend, _ = load_backend("ort", onnx_dir, device="cpu")
    name = "the ONNX graph (ORT CPU)"
    try:
        reference = record_backend(reference_backend, spec, name, max_batch=limits.max_batch)
    finally:
        reference_backend.close()  # one model at a time: the reference is freed before the engine loads
    engine, _ = load_backend("trt", engine_dir, device=f"cuda:{device}")
    try:
        return validate_backend(engine, reference, spec, precision, reference_name=name, target=ENGINE)
    finally:
        engine.close()
