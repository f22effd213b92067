"""The quality gate of a quantized export: held-out perplexity of the quantized graph vs the float32 graph.

Both graphs run on ONNX Runtime, one session at a time, over the same text with the same windows
(``cpm_infer.eval``). The export is refused when perplexity rises by more than the scheme's threshold
(defaults: int8 +2%, int4 +10%), or when the mean next-token KL from the float32 graph passes the scheme's limit
(``export.quant_kl``), unless forced; the numbers go to the manifest either way. The default text is the demo
model's held-out chapter (三国演义 chapter 60, never trained on); for other models pass text of
their own domain (``--gate-file``). Too little text is refused: a perplexity over a few hundred
tokens moves by more than the thresholds on its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError
from cpm_infer.tokenizer import CpmTokenizer
from export.quant_kl import KL_THRESHOLDS, mean_kl, reference_logprobs

if TYPE_CHECKING:
    from cpm_infer.eval import PerplexityResult

log = logging.getLogger(__name__)

THRESHOLDS = {"int8": 0.02, "int4": 0.10}  # relative perplexity increase allowed by default
MIN_TOKENS = 1000  # predicted tokens a gate text must give


class QualityGateError(CpmError):
    """The quantized graph lost more perplexity than allowed (and the gate was not forced)."""


@dataclass
class GateResult:
    file: str
    tokens: int
    window: int
    stride: int
    fp32_perplexity: float
    quantized_perplexity: float
    increase: float  # relative: quantized / fp32 - 1
    threshold: float
    passed: bool
    forced: bool
    kl_mean: float | None = None  # mean next-token KL(float32 || quantized), nats (export.quant_kl)
    kl_threshold: float | None = None
    kl_positions: int = 0

    @classmethod
    def compare(
        cls, path: Path, base: PerplexityResult, quantized: PerplexityResult, threshold: float, forced: bool
    ) -> GateResult:
        """The verdict on the two graphs' perplexities, measured over the same windows of ``path``."""
        increase = quantized.perplexity / base.perplexity - 1
        scored = (base.tokens, base.window, base.stride)
        perplexities = (base.perplexity, quantized.perplexity, increase)
        return cls(str(path), *scored, *perplexities, threshold, increase <= threshold, forced)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else ("FAILED, forced" if self.forced else "FAILED")
        kl = (
            ""
            if self.kl_mean is None
            else (
                f"; next-token KL from float32 {self.kl_mean:.1e} (limit {self.kl_threshold:.3g}) over "
                f"{self.kl_positions} positions"
            )
        )
        return (
            f"quality gate {verdict}: perplexity {self.fp32_perplexity:.3f} (float32) -> "
            f"{self.quantized_perplexity:.3f} "
            f"({self.increase:+.2%}, limit +{self.threshold:.0%}) over {self.tokens} tokens of {Path(self.file).name}"
            f"{kl}"
        )


def default_gate_file() -> Path | None:
    """The demo model's held-out chapter, where the package ships it."""
    from cpm_infer.demo import DEMO_DIR

    path = DEMO_DIR / "heldout.txt"
    return path if path.is_file() else None


def run_gate(
    fp32_graph: Path,
    quantized_graph: Path,
    spec: ModelSpec,
    tokenizer: CpmTokenizer,
    *,
    scheme: str,
    gate_file: str | os.PathLike[str] | None = None,
    threshold: float | None = None,
    kl_threshold: float | None = None,
    force: bool = False,
    threads: int | None = None,
    min_tokens: int = MIN_TOKENS,
    say: Callable[[str], None] = lambda message: None,
) -> GateResult:
    """Measure both graphs; raise QualityGateError past the threshold unless ``force``."""
    from cpm_infer.backends.ort_backend import OrtBackend, create_session
    from cpm_infer.eval import perplexity, read_documents

    path = Path(gate_file) if gate_file is not None else default_gate_file()
    if path is None:
        raise QualityGateError(
            "no gate text: pass --gate-file (held-out text in the model's domain); the demo held-out chapter "
            "is not installed"
        )
    limit = THRESHOLDS[scheme] if threshold is None else threshold
    if limit < 0:
        raise QualityGateError(f"the gate threshold must be >= 0, got {limit}")
    kl_limit = KL_THRESHOLDS[scheme] if kl_threshold is None else kl_threshold
    if kl_limit < 0:
        raise QualityGateError(f"the gate's KL threshold must be >= 0, got {kl_limit}")
    documents = read_documents(path)
    results = []
    for label, graph in (("float32", fp32_graph), (scheme, quantized_graph)):
        say(f"quality gate: perplexity of the {label} graph on {path.name}")
        backend = OrtBackend(create_session(graph, threads=threads), spec)
        results.append(perplexity(backend, tokenizer, documents, min_tokens=min_tokens))
        if label == "float32":  # its next-token log-probabilities, kept for the KL (export.quant_kl)
            reference = reference_logprobs(backend, tokenizer, documents)
        else:
            kl = mean_kl(reference, backend)
        del backend  # one session at a time: the float32 one is gone before the quantized one loads
    result = GateResult.compare(path, *results, limit, force)
    result.kl_mean, result.kl_threshold, result.kl_positions = kl, kl_limit, reference.positions
    result.passed = result.passed and kl <= kl_limit
    del reference
    log.info("%s", result.summary())
    if not result.passed and not force:
        raise QualityGateError(f"{result.summary()}; refusing the export (pass --force-quality to write it anyway)")
    return result


class GateOptions(Protocol):
    """The quality gate's settings of a quantized export (``export.quantize.QuantizeOptions`` has them)."""

    scheme: str
    gate_file: str | os.PathLike[str] | None
    gate_threshold: float | None
    gate_kl_threshold: float | None
    force_quality: bool


def run_gate_for(
    options: GateOptions,
    fp32_graph: Path,
    quantized_graph: Path,
    spec: ModelSpec,
    tokenizer: CpmTokenizer,
    *,
    threads: int | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> GateResult:
    """``run_gate`` with the settings ``options`` of a quantized export."""
    settings = {"gate_file": options.gate_file, "threshold": options.gate_threshold, "force": options.force_quality}
    settings["kl_threshold"] = options.gate_kl_threshold
    return run_gate(
        fp32_graph, quantized_graph, spec, tokenizer, scheme=options.scheme, threads=threads, say=say, **settings
    )
