"""Is this engine usable here? TensorRT engines are tied to the exact TensorRT release and the GPU
model they were built on (serialized plans are not portable across versions or devices unless built
version/hardware-compatible, which ours are not). Checked from the manifest before deserializing,
so the user gets one line instead of a TensorRT stack trace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpm_infer.errors import CpmError


class EngineMismatchError(CpmError):
    """The engine was built for another TensorRT release or GPU model."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What the current machine offers: installed TensorRT and the selected GPU."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "7.0"

    def to_details(self) -> dict[str, str]:
        return {
            "tensorrt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
        }


def cc_string(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def check_engine_compatible(
    details: dict[str, Any], here: RuntimeInfo, *, rebuild_hint: str = "cpm export trt"
) -> None:
    """Raise a one-line EngineMismatchError unless the engine's build machine matches ``here``."""
    missing = [k for k in ("tensorrt_version", "gpu_name", "compute_capability") if not details.get(k)]
    if missing:
        raise EngineMismatchError(f"engine manifest lacks {', '.join(missing)}; rebuild the engine with {rebuild_hint}")
    built_trt, built_gpu, built_cc = (
        str(details["tensorrt_version"]),
        str(details["gpu_name"]),
        str(details["compute_capability"]),
    )
    if built_trt != here.trt_version:
        raise EngineMismatchError(
            f"engine was built with TensorRT {built_trt} but TensorRT {here.trt_version} is installed; "
            f"TensorRT only loads engines of its own release: rebuild it here with {rebuild_hint}"
        )
    if built_gpu != here.gpu_name or built_cc != here.compute_capability:
        raise EngineMismatchError(
            f"engine was built for {built_gpu} (sm {built_cc}) but this GPU is {here.gpu_name} (sm "
            f"{here.compute_capability}); "
            f"engines are tuned per GPU model: rebuild it here with {rebuild_hint}"
        )
