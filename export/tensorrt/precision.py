"""Which GPU each TensorRT release supports, what ``--precision auto`` picks, and how to build it.

Facts this encodes (TensorRT release notes and support matrices):
- TensorRT >= 8.6: the exported graph (opset 17) uses ``LayerNormalization``, which the ONNX parser
  reads from 8.6 on (onnx-tensorrt's operator table: "N" in 8.5, "Y" in 8.6); the runtime's
  named-tensor API (``set_input_shape``/``set_tensor_address``/``execute_async_v3``) is older (8.5).
- Pascal (sm_6x) and Maxwell (sm_5x): TensorRT 8.6 is the last release; 9.x/10.x target sm_70+.
- Volta (sm_70, V100): deprecated in 10.0, removed in 10.5.
- TensorRT 11 removed weak typing (``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``): every
  network is strongly typed and its precision comes from the ONNX graph's own types. So ``auto`` on a
  float32 artifact builds FP32 there (``resolve_build``), saying how to get FP16.
- GP102/GP104 (GTX 1080 Ti, sm_61) run FP16 arithmetic at 1/64 of their FP32 rate, so FP16 is slower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpm_infer.errors import CpmError

PRECISIONS = ("auto", "fp16", "fp32")
MIN_TRT = (8, 6)  # opset-17 LayerNormalization in the ONNX parser
LAST_PASCAL_TRT = (8, 6)  # last major.minor supporting sm_5x/sm_6x
VOLTA_REMOVED = (10, 5)
WEAK_TYPING_REMOVED = (11, 0)
STRONG_TYPING_ADDED = (10, 0)  # NetworkDefinitionCreationFlag.STRONGLY_TYPED in every 10.x release

# Build modes: how TensorRT is told the precision.
FP32 = "fp32"  # no reduced-precision flag; TF32 cleared so "fp32" means IEEE float32 GEMMs
FP16_CONSTRAINED = "fp16-constrained"  # BuilderFlag.FP16 + OBEY_PRECISION_CONSTRAINTS on chosen layers
FP16_STRONG = "fp16-strongly-typed"  # STRONGLY_TYPED network from a float16 ONNX graph


class PrecisionError(CpmError):
    """A precision, GPU and TensorRT version that do not go together."""


def parse_version(text: str) -> tuple[int, int, int]:
    """'8.6.1.post1' -> (8, 6, 1); '10.4.0' -> (10, 4, 0)."""
    numbers = [int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3]]
    if len(numbers) < 2:
        raise PrecisionError(f"cannot read a TensorRT version from {text!r}")
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def check_trt_supports(gpu_name: str, cc: tuple[int, int], trt_version: tuple[int, int, int]) -> None:
    """Raise a one-line PrecisionError when the installed TensorRT cannot run on this GPU."""
    where = f"{gpu_name} (sm_{cc[0]}{cc[1]})"
    if trt_version[:2] < MIN_TRT:
        raise PrecisionError(
            f"TensorRT {_fmt(trt_version)} is too old: its ONNX parser cannot read the exported LayerNormalization "
            f"(opset 17); install TensorRT >= {_fmt(MIN_TRT)}"
        )
    if cc < (7, 0) and trt_version[:2] > LAST_PASCAL_TRT:
        raise PrecisionError(
            f"TensorRT {_fmt(trt_version)} does not support {where}: 8.6 is the last release for Pascal/Maxwell "
            f"GPUs; install it with: pip install 'tensorrt==8.6.*'"
        )
    if (7, 0) <= cc < (7, 5) and trt_version[:2] >= VOLTA_REMOVED:
        raise PrecisionError(
            f"TensorRT {_fmt(trt_version)} does not support {where}: Volta support was removed in TensorRT 10.5; "
            f"install an older one with: pip install 'tensorrt<10.5'"
        )


def choose_precision(requested: str, cc: tuple[int, int]) -> tuple[str, str]:
    """(``fp16`` | ``fp32``, one-line reason) for ``--precision`` on a GPU of compute capability ``cc``."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    sm = f"sm_{cc[0]}{cc[1]}"
    if requested == "fp32":
        return "fp32", "fp32 as requested"
    if requested == "fp16":
        if cc < (7, 0):
            return (
                "fp16",
                f"fp16 as requested (warning: {sm} has no fast FP16 path except the P100, expect it to be slower)",
            )
        return "fp16", "fp16 as requested"
    if cc < (6, 0):
        return "fp32", f"auto -> fp32: {sm} (Maxwell) has no fast FP16 arithmetic"
    if cc < (7, 0):
        return "fp32", (
            f"auto -> fp32: Pascal ({sm}) runs FP16 at 1/64 of its FP32 rate on GP102/GP104, so FP16 would be slower "
            f"(a P100, sm_60, is the exception: pass --precision fp16 to try it)"
        )
    if cc < (7, 5):
        return "fp16", f"auto -> fp16: Volta ({sm}) has FP16 tensor cores"
    return "fp16", f"auto -> fp16: {sm} has FP16 tensor cores"


@dataclass(frozen=True)
class BuildPlan:
    precision: str  # fp16 | fp32
    mode: str  # FP32 | FP16_CONSTRAINED | FP16_STRONG
    kv_dtype: str  # float16 | float32: element type of past/present tensors in the engine
    note: str = ""


def plan_build(precision: str, onnx_dtype: str, trt_version: tuple[int, int, int]) -> BuildPlan:
    """How to build ``precision`` from an ONNX graph of ``onnx_dtype`` with this TensorRT."""
    if onnx_dtype not in ("float32", "float16"):
        raise PrecisionError(f"ONNX artifact dtype {onnx_dtype!r} is neither float32 nor float16")
    if precision == "fp32":
        if onnx_dtype != "float32":
            raise PrecisionError(
                "an FP32 engine needs a float32 ONNX artifact, this one is float16: re-export it without --fp16"
            )
        return BuildPlan("fp32", FP32, "float32")
    if precision != "fp16":
        raise PrecisionError(f"unknown precision {precision!r} (expected fp16 or fp32 once resolved)")
    if onnx_dtype == "float16" and trt_version[:2] >= STRONG_TYPING_ADDED:
        return BuildPlan(
            "fp16", FP16_STRONG, "float16", "strongly typed: the graph's float32 LayerNorm/softmax casts are obeyed"
        )
    if trt_version[:2] >= WEAK_TYPING_REMOVED:
        raise PrecisionError(
            f"TensorRT {_fmt(trt_version)} builds only strongly typed networks, so an FP16 engine needs a float16 ONNX "
            "artifact: re-export with `cpm export onnx --fp16` (or use --precision fp32, or TensorRT 10.x)"
        )
    note = "BuilderFlag.FP16 with FP32 precision constraints on LayerNorm statistics and softmax"
    if trt_version[:2] >= (10, 12):
        note += " (weak typing is deprecated since TensorRT 10.12)"
    return BuildPlan("fp16", FP16_CONSTRAINED, "float16", note)


def resolve_build(
    requested: str, cc: tuple[int, int], onnx_dtype: str, trt_version: tuple[int, int, int]
) -> tuple[BuildPlan, str]:
    """``--precision`` -> (build plan, one-line reason). An explicit fp16/fp32 that this TensorRT and
    artifact cannot build is refused (``plan_build``); ``auto`` picks what can be built instead:

    - FP16 wanted, float32 artifact, TensorRT >= 11 (strong typing only): FP32, naming ``--fp16``.
    - FP32 wanted (Pascal/Maxwell), float16 artifact: FP16, the only engine that artifact gives.
    """
    precision, reason = choose_precision(requested, cc)
    if requested == "auto":
        if precision == "fp16" and onnx_dtype == "float32" and trt_version[:2] >= WEAK_TYPING_REMOVED:
            reason = (
                f"auto -> fp32: TensorRT {_fmt(trt_version)} builds only strongly typed networks and this ONNX "
                "artifact is float32; for an FP16 engine re-export it with `cpm export onnx --fp16`"
            )
            precision = "fp32"
        elif precision == "fp32" and onnx_dtype == "float16":
            reason = f"auto -> fp16: the ONNX artifact is float16, an FP32 engine needs a float32 one ({reason})"
            precision = "fp16"
    return plan_build(precision, onnx_dtype, trt_version), reason
