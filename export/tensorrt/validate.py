"""Engine validation: the engine against a reference backend (the source ONNX graph on ONNX Runtime)
through the ``Backend`` protocol, on the same cases as the ONNX export's validation.

Teacher-forced: after prefill both sides decode the reference's greedy token, so one near-tie does
not derail every later step. Per step it compares last-position logits, (B, V) float32:

- logits within ``atol + rtol * max|reference|``;
- greedy agreement: the share of rows whose argmax matches the reference's.

Tolerances. FP32 engines (TF32 off) differ from the float32 graph by summation order only. FP16
engines are compared with the float32 graph, so the budget is half-precision rounding through the
layers; argmax may flip only on near-ties, hence the 0.95 agreement floor rather than 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError
from cpm_infer.generate import left_pad
from export.validate import Tolerance, validation_cases

ENGINE_TOLERANCES = {
    "fp32": (Tolerance(atol=1e-3, rtol=1e-3), 1.0),
    "fp16": (Tolerance(atol=2e-2, rtol=2e-2), 0.95),
}


class EngineValidationError(CpmError):
    """An engine disagrees with its reference beyond the tolerance."""


@dataclass
class StepCheck:
    case: str
    step: str
    logits_diff: float
    tolerance: float
    agreement: float  # share of rows with the reference's argmax

    @property
    def ok(self) -> bool:
        return self.logits_diff <= self.tolerance


@dataclass
class EngineReport:
    precision: str
    reference: str
    status: str  # passed | failed | not run
    reason: str = ""
    checks: list[StepCheck] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return float(np.mean([c.agreement for c in self.checks])) if self.checks else 0.0

    @property
    def max_diff(self) -> float:
        return max((c.logits_diff for c in self.checks), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        tol, floor = ENGINE_TOLERANCES[self.precision]
        data = asdict(self)
        data.update(
            tolerance=asdict(tol), min_agreement=floor, greedy_agreement=self.agreement, max_logits_diff=self.max_diff
        )
        for row, check in zip(data["checks"], self.checks, strict=True):
            row["ok"] = check.ok
        return data

    def raise_for_failure(self) -> None:
        if self.status != "failed":
            return
        worst = max(self.checks, key=lambda c: c.logits_diff - c.tolerance)
        raise EngineValidationError(
            f"engine validation failed: logits differ from {self.reference} by up to {self.max_diff:.3g} "
            f"(tolerance {worst.tolerance:.3g} in {worst.case}, {worst.step}), greedy agreement {self.agreement:.1%}"
        )


def compare_step(case: str, step: str, got: np.ndarray, ref: np.ndarray, precision: str) -> StepCheck:
    """One step's check of (B, V) logits."""
    if got.shape != ref.shape:
        raise EngineValidationError(f"{case}, {step}: engine logits have shape {got.shape}, reference {ref.shape}")
    tol, _ = ENGINE_TOLERANCES[precision]
    diff = float(np.max(np.abs(got.astype(np.float32) - ref.astype(np.float32)), initial=0.0))
    if not np.isfinite(got).all():
        diff = float("inf")
    agreement = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    return StepCheck(case, step, diff, tol.of(ref), agreement)


def validate_backend(
    candidate: Backend,
    reference: Backend,
    spec: ModelSpec,
    precision: str,
    *,
    reference_name: str = "the ONNX graph",
    decode_steps: int = 3,
    max_batch: int | None = None,
    seed: int = 0,
) -> EngineReport:
    """Run the validation cases on both backends; return the report (raises only on shape errors)."""
    report = EngineReport(precision=precision, reference=reference_name, status="passed")
    for case, prompts in validation_cases(spec, seed):
        if max_batch is not None and len(prompts) > max_batch:
            prompts = prompts[:max_batch]
            case = f"{case} (first {max_batch})"
        ids, mask, pos = left_pad(prompts, pad_id=0)
        got, got_state = candidate.prefill(ids, mask, pos)
        ref, ref_state = reference.prefill(ids, mask, pos)
        report.checks.append(compare_step(case, f"prefill (seq {ids.shape[1]})", got, ref, precision))
        for step in range(1, decode_steps + 1):
            ids = ref.argmax(-1)[:, None].astype(np.int64)
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            got, got_state = candidate.decode(got_state, ids, mask, pos)
            ref, ref_state = reference.decode(ref_state, ids, mask, pos)
            report.checks.append(compare_step(case, f"decode {step} (past {mask.shape[1] - 1})", got, ref, precision))
    _, floor = ENGINE_TOLERANCES[precision]
    if not all(c.ok for c in report.checks) or report.agreement < floor:
        report.status = "failed"
    return report
