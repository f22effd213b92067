"""One validator for every exported artifact: a reference trajectory, checks against it, one report.

The reference runs first and is recorded (``export.reference``: transformers' GPT2LMHeadModel for ONNX
exports, any backend, e.g. the ONNX graph on ONNX Runtime, for TensorRT engines), so the model that
produced it is freed before the candidate is loaded: one model in memory at a time.

Two kinds of check, both in the same report:

- ``graph``: the raw ONNX graph on an InferenceSession, every output: logits at every real position
  and every present key/value (each side feeding back its own cache);
- ``backend``: the runtime backend users run (``OrtBackend`` with IO binding and the manifest's KV
  mode, or the TensorRT backend): last-position logits and greedy agreement (the share of rows
  whose argmax is the reference's).

A diff passes within ``atol + rtol * max|reference|``; tolerances per artifact format and precision
are in ``TOLERANCES``. A failed report is kept by the caller next to the output directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer import kv
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError
from export.reference import Reference, record_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_agreement: float = 0.0  # greedy agreement floor of backend checks (0: reported, not judged)

    def of(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.max(np.abs(reference), initial=0.0))


# (artifact format, dtype). float32 ONNX graphs differ from eager by kernel summation order only;
# float16 graphs and engines are compared with the float32 model (what users expect to get), so their
# budget is half-precision rounding over the layers, and an argmax may flip on near-ties. float32
# engines (TF32 off) run other kernels (cuBLAS, TensorRT tactics) than the CPU reference.
TOLERANCES = {
    ("onnx", "float32"): Tolerance(atol=1e-4, rtol=1e-4),
    ("onnx", "float16"): Tolerance(atol=2e-2, rtol=2e-2),
    ("tensorrt", "float32"): Tolerance(atol=1e-3, rtol=1e-3, min_agreement=1.0),
    ("tensorrt", "float16"): Tolerance(atol=2e-2, rtol=2e-2, min_agreement=0.95),
}
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


class ValidationError(CpmError):
    """An exported graph or engine disagrees with its reference beyond the tolerance."""

    def __init__(
        self,
        message: str,
        *,
        graph: str = "",
        case: str = "",
        output: str = "",
        max_diff: float = 0.0,
        tolerance: float = 0.0,
    ) -> None:
        self.graph, self.case, self.output, self.max_diff, self.tolerance = graph, case, output, max_diff, tolerance
        super().__init__(message)


@dataclass
class Check:
    case: str
    step: str
    logits_diff: float
    logits_tolerance: float
    present_diff: float | None = None  # graph checks: the worst present key/value
    present_tolerance: float | None = None
    worst_present: str = ""
    via: str = "graph"  # graph | backend
    agreement: float | None = None  # backend checks: share of rows with the reference's argmax

    @property
    def ok(self) -> bool:
        presents_ok = self.present_diff is None or self.present_diff <= (self.present_tolerance or 0.0)
        return self.logits_diff <= self.logits_tolerance and presents_ok


@dataclass
class ValidationReport:
    """What ran, where, against what, and how close it came. ``status``: passed | failed | not run."""

    graph: str  # the file validated (graph or engine)
    dtype: str
    provider: str
    status: str
    reason: str = ""
    checks: list[Check] = field(default_factory=list)
    format: str = "onnx"
    reference: str = "eager PyTorch"

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[(self.format, self.dtype)]

    @property
    def agreement(self) -> float:
        rows = [c.agreement for c in self.checks if c.agreement is not None]
        return float(np.mean(rows)) if rows else 1.0

    @property
    def max_diff(self) -> float:
        return max((c.logits_diff for c in self.checks), default=0.0)

    def judge(self) -> ValidationReport:
        has_backend = any(c.via == "backend" for c in self.checks)
        agreement_ok = not has_backend or self.agreement >= self.tolerance.min_agreement
        self.status = "passed" if all(c.ok for c in self.checks) and agreement_ok else "failed"
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            tolerance=asdict(self.tolerance),
            min_agreement=self.tolerance.min_agreement,
            greedy_agreement=self.agreement,
            max_logits_diff=self.max_diff,
        )
        for row, check in zip(data["checks"], self.checks, strict=True):
            row["ok"] = check.ok
        return data

    def raise_for_failure(self, report_path: Path | None = None) -> None:
        if self.status != "failed":
            return
        where = f" (report: {report_path})" if report_path else ""
        for check in self.checks:
            if check.via != "graph" or check.ok:
                continue
            output, diff, tol = kv.LOGITS, check.logits_diff, check.logits_tolerance
            if check.logits_diff <= check.logits_tolerance:
                output, diff, tol = check.worst_present, check.present_diff or 0.0, check.present_tolerance or 0.0
            case = f"{check.case}, {check.step}"
            raise ValidationError(
                f"validation of {self.graph} failed: {output} differs from {self.reference} by {diff:.3g} "
                f"(tolerance {tol:.3g}) in {case}{where}",
                graph=self.graph,
                case=case,
                output=output,
                max_diff=diff,
                tolerance=tol,
            )
        backend = [c for c in self.checks if c.via == "backend"] or self.checks
        worst = max(backend, key=lambda c: c.logits_diff - c.logits_tolerance)
        subject = "engine validation"
        if self.format != "tensorrt":
            subject = f"validation of {self.graph} through its backend"
        raise ValidationError(
            f"{subject} failed: logits differ from {self.reference} by up to {self.max_diff:.3g} "
            f"(tolerance {worst.logits_tolerance:.3g} in {worst.case}, {worst.step}), "
            f"greedy agreement {self.agreement:.1%}{where}",
            graph=self.graph,
            case=f"{worst.case}, {worst.step}",
            output=kv.LOGITS,
            max_diff=self.max_diff,
            tolerance=worst.logits_tolerance,
        )


def write_report(reports: list[ValidationReport], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n", encoding="utf-8")


def failed_report_path(out_dir: Path) -> Path:
    """Where the report of a failed validation is kept: next to OUT_DIR (whose staging is deleted)."""
    return out_dir.with_name(f"{out_dir.name}.validation-failed.json")


def raise_for_failures(reports: list[ValidationReport], out_dir: Path) -> None:
    """If a report failed: keep every report next to ``out_dir`` and raise, naming that file."""
    failed = [r for r in reports if r.status == "failed"]
    if failed:
        path = failed_report_path(out_dir)
        write_report(reports, path)
        failed[0].raise_for_failure(path)


# -- the checks ----------------------------------------------------------------------------------------
def _masked_max(a: np.ndarray, b: np.ndarray, real: np.ndarray) -> float:
    """Max |a - b| over real positions. a, b: (B, T, V) with real (B, T), or (B, nh, L, hs) with real (B, L)."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
    if diff.ndim == 4:
        diff = diff.transpose(0, 2, 1, 3)
    picked = diff[real.astype(bool)]
    if not np.isfinite(picked).all():
        return float("inf")
    return float(picked.max()) if picked.size else 0.0


def check_graph(session: Any, reference: Reference, spec: ModelSpec, tolerance: Tolerance, dtype: str) -> list[Check]:
    """Every output of the raw graph (all-position logits, every present) against an eager reference."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    names = kv.present_names(spec.n_layer)
    keep = kv.keeps_logits([i.name for i in session.get_inputs()])
    checks = []
    for steps in reference.cases:
        past = [np.zeros(kv.kv_shape(spec, steps[0].ids.shape[0], 0), dtype=np_dtype)] * len(names)
        for ref in steps:
            feeds = {kv.INPUT_IDS: ref.ids, kv.ATTENTION_MASK: ref.mask, kv.POSITION_IDS: ref.pos}
            feeds.update(zip(kv.past_names(spec.n_layer), past, strict=True))
            if keep:  # every position (the backend checks below take the last-position path)
                feeds[kv.LOGITS_TO_KEEP] = kv.keep_feed(last=False)
            got = session.run(None, feeds)
            assert ref.presents is not None, "graph checks need an eager reference"
            present_diffs = [_masked_max(g, r, ref.mask) for g, r in zip(got[1:], ref.presents, strict=True)]
            worst = int(np.argmax(present_diffs))
            checks.append(
                Check(
                    case=ref.case,
                    step=ref.step,
                    logits_diff=_masked_max(got[0], ref.logits, ref.mask[:, -ref.ids.shape[1] :]),
                    logits_tolerance=tolerance.of(ref.logits),
                    present_diff=present_diffs[worst],
                    present_tolerance=tolerance.of(ref.presents[worst]),
                    worst_present=names[worst],
                )
            )
            past = got[1:]
    return checks


def check_backend(backend: Any, reference: Reference, tolerance: Tolerance) -> list[Check]:
    """The runtime backend, fed the reference's tokens: last-position logits and greedy agreement."""
    checks = []
    for steps in reference.cases:
        state = None
        for ref in steps:
            if state is None:
                got, state = backend.prefill(ref.ids, ref.mask, ref.pos)
            else:
                got, state = backend.decode(state, ref.ids, ref.mask, ref.pos)
            want = ref.last_logits
            if got.shape != want.shape:
                raise ValidationError(
                    f"{ref.case}, {ref.step}: {backend.name} logits have shape {got.shape}, reference {want.shape}"
                )
            diff = float(np.max(np.abs(got.astype(np.float32) - want), initial=0.0))
            if not np.isfinite(got).all():
                diff = float("inf")
            agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
            checks.append(Check(ref.case, ref.step, diff, tolerance.of(want), via="backend", agreement=agreement))
    return checks


def validate_backend(
    candidate: Any,
    reference: Any,
    spec: ModelSpec,
    precision: str,
    *,
    reference_name: str = "the ONNX graph",
    artifact_format: str = "tensorrt",
    target: str = "model.engine",
    decode_steps: int = 3,
    max_batch: int | None = None,
    seed: int = 0,
) -> ValidationReport:
    """A backend against a reference (a recorded ``Reference``, or a backend recorded here first)."""
    if not isinstance(reference, Reference):
        reference = record_backend(
            reference, spec, reference_name, decode_steps=decode_steps, max_batch=max_batch, seed=seed
        )
    dtype = PRECISION_DTYPES[precision]
    report = ValidationReport(
        target, dtype, getattr(candidate, "name", "backend"), "passed", format=artifact_format, reference=reference.name
    )
    report.checks = check_backend(candidate, reference, report.tolerance)
    return report.judge()


def validate_onnx_graph(
    graph: Path,
    reference: Reference,
    spec: ModelSpec,
    dtype: str,
    *,
    kv_shared: bool = False,
    device: str = "cpu",
    threads: int | None = None,
) -> ValidationReport:
    """One ONNX graph, one session: the raw graph, then ``OrtBackend`` as the artifact's manifest
    configures it (IO binding, shared KV buffers when the graph supports them)."""
    from cpm_infer.backends.ort_backend import OrtBackend, OrtLoadError, create_session

    try:
        session = create_session(graph, device=device, threads=threads)
    except OrtLoadError as exc:
        if dtype != "float16" or not device.startswith("cpu"):
            raise
        log.warning("fp16 graph not validated on CPU: %s", exc)
        return ValidationReport(
            graph.name, dtype, "CPUExecutionProvider", "not run", f"{exc}; validate it on a GPU with --device cuda"
        )
    report = ValidationReport(graph.name, dtype, session.get_providers()[0], "passed", reference=reference.name)
    report.checks = check_graph(session, reference, spec, report.tolerance, dtype)
    backend = OrtBackend(session, spec, dtype=dtype, device=device, io_binding=True, kv_shared=kv_shared)
    report.checks += check_backend(backend, reference, report.tolerance)
    del backend, session  # one session at a time: the next graph is loaded after this one is gone
    report.judge()
    if dtype == "float16" and report.provider == "CPUExecutionProvider":
        # ORT's CPU provider lacks fp16 kernels for most ops and inserts float32 casts around them.
        report.reason = (
            "ran on the CPU provider, which computes most float16 ops in float32 (inserted casts): "
            "checks graph, IO types and fp16 storage, not fp16 arithmetic; validate on a GPU with --device cuda"
        )
    log.info("validation of %s on %s: %s", graph.name, report.provider, report.status)
    return report
