"""Validation of an exported graph: ONNX Runtime vs eager transformers on the same inputs.

Cases: batch 1, batch 4, and a left-padded batch, each a prefill (past 0) then decode steps where
each side feeds back its own cache. Compared: logits and every present key/value, at real (not
padded) positions only: what a padded slot holds is never read, since the mask hides it. A diff
passes if it is within ``atol + rtol * max|reference|`` for the graph's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer import kv
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError
from cpm_infer.generate import left_pad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def of(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.max(np.abs(reference), initial=0.0))


# fp32 graphs differ from eager by kernel summation order only; fp16 graphs are compared with the
# fp32 model (what users expect to get), so their budget is half-precision rounding over the layers.
TOLERANCES = {"float32": Tolerance(atol=1e-4, rtol=1e-4), "float16": Tolerance(atol=2e-2, rtol=2e-2)}


class ValidationError(CpmError):
    """An exported graph disagrees with eager PyTorch beyond the tolerance."""

    def __init__(self, graph: str, case: str, output: str, max_diff: float, tolerance: float) -> None:
        self.graph, self.case, self.output, self.max_diff, self.tolerance = graph, case, output, max_diff, tolerance
        super().__init__(
            f"validation of {graph} failed: {output} differs from eager PyTorch by {max_diff:.3g} "
            f"(tolerance {tolerance:.3g}) in {case}"
        )


@dataclass
class Check:
    case: str
    step: str
    logits_diff: float
    logits_tolerance: float
    present_diff: float
    present_tolerance: float
    worst_present: str

    @property
    def ok(self) -> bool:
        return self.logits_diff <= self.logits_tolerance and self.present_diff <= self.present_tolerance


@dataclass
class ValidationReport:
    """What ran, where, and how close it came. ``status``: passed | failed | not run (with reason)."""

    graph: str
    dtype: str
    provider: str
    status: str
    reason: str = ""
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tolerance"] = asdict(TOLERANCES[self.dtype])
        for row, check in zip(data["checks"], self.checks, strict=True):
            row["ok"] = check.ok
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        checks = [Check(**{k: v for k, v in row.items() if k != "ok"}) for row in data.get("checks", [])]
        return cls(data["graph"], data["dtype"], data["provider"], data["status"], data.get("reason", ""), checks)

    def raise_for_failure(self) -> None:
        for check in self.checks:
            if check.logits_diff > check.logits_tolerance:
                raise ValidationError(
                    self.graph, f"{check.case}, {check.step}", kv.LOGITS, check.logits_diff, check.logits_tolerance
                )
            if check.present_diff > check.present_tolerance:
                raise ValidationError(
                    self.graph,
                    f"{check.case}, {check.step}",
                    check.worst_present,
                    check.present_diff,
                    check.present_tolerance,
                )


def validation_cases(spec: ModelSpec, seed: int = 0) -> list[tuple[str, list[list[int]]]]:
    """(name, prompts): batch 1, batch 4, and a left-padded batch of uneven prompts."""
    rng = np.random.default_rng(seed)
    length = max(2, min(8, spec.n_positions // 4))

    def prompt(n: int) -> list[int]:
        return rng.integers(0, spec.vocab_size, size=n).tolist()

    return [
        ("batch 1", [prompt(length)]),
        ("batch 4", [prompt(length) for _ in range(4)]),
        ("left-padded batch 3", [prompt(length), prompt(max(1, length // 2)), prompt(1)]),
    ]


class EagerReference:
    """transformers' GPT2LMHeadModel with its DynamicCache: all-position logits and the cache as numpy."""

    def __init__(self, model: Any) -> None:
        import torch

        self.torch, self.model = torch, model.eval()
        self.device = next(model.parameters()).device

    def run(
        self, cache: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], Any]:
        t = self.torch
        with t.inference_mode():
            out = self.model(
                input_ids=t.from_numpy(ids).to(self.device),
                attention_mask=t.from_numpy(mask).to(self.device),
                position_ids=t.from_numpy(pos).to(self.device),
                cache=cache,
                use_cache=True,
            )
        presents = [
            getattr(layer, part).float().cpu().numpy() for layer in out.cache.layers for part in ("keys", "values")
        ]
        return out.logits.float().cpu().numpy(), presents, out.cache


def _masked_max(a: np.ndarray, b: np.ndarray, real: np.ndarray) -> float:
    """Max |a - b| over real positions. a, b: (B, T, V) with real (B, T), or (B, nh, L, hs) with real (B, L)."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
    if diff.ndim == 4:
        diff = diff.transpose(0, 2, 1, 3)
    picked = diff[real.astype(bool)]
    return float(picked.max()) if picked.size else 0.0


def validate_graph(
    session: Any,
    graph_name: str,
    reference: EagerReference,
    spec: ModelSpec,
    dtype: str,
    *,
    decode_steps: int = 3,
    seed: int = 0,
) -> ValidationReport:
    """Run every case on ``session`` and the reference; return the report (raises nothing)."""
    tol = TOLERANCES[dtype]
    np_dtype = np.float16 if dtype == "float16" else np.float32
    names = kv.present_names(spec.n_layer)
    report = ValidationReport(graph=graph_name, dtype=dtype, provider=session.get_providers()[0], status="passed")
    for case, prompts in validation_cases(spec, seed):
        ids, mask, pos = left_pad(prompts, pad_id=0)
        past = [np.zeros(kv.kv_shape(spec, len(prompts), 0), dtype=np_dtype)] * len(names)
        cache = None
        for step in range(decode_steps + 1):
            feeds = {
                kv.INPUT_IDS: ids,
                kv.ATTENTION_MASK: mask,
                kv.POSITION_IDS: pos,
                **dict(zip(kv.past_names(spec.n_layer), past, strict=False)),
            }
            got = session.run(None, feeds)
            ref_logits, ref_presents, cache = reference.run(cache, ids, mask, pos)
            present_diffs = [_masked_max(g, r, mask) for g, r in zip(got[1:], ref_presents, strict=True)]
            worst = int(np.argmax(present_diffs))
            report.checks.append(
                Check(
                    case=case,
                    step=f"prefill (seq {ids.shape[1]})" if step == 0 else f"decode {step} (past {mask.shape[1] - 1})",
                    logits_diff=_masked_max(got[0], ref_logits, mask[:, -ids.shape[1] :]),
                    logits_tolerance=tol.of(ref_logits),
                    present_diff=present_diffs[worst],
                    present_tolerance=tol.of(ref_presents[worst]),
                    worst_present=names[worst],
                )
            )
            # Both sides continue with the reference's greedy token and their own cache.
            ids = ref_logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            past = got[1:]
    if not all(check.ok for check in report.checks):
        report.status = "failed"
    log.info("validation of %s on %s: %s", graph_name, report.provider, report.status)
    return report


def write_report(reports: list[ValidationReport], path: Path) -> None:
    import json

    path.write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n", encoding="utf-8")


def read_report(path: Path) -> list[ValidationReport]:
    from cpm_infer.artifact import read_json

    return [ValidationReport.from_dict(row) for row in read_json(path)]
