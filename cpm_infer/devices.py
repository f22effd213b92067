"""One device parser for every runtime and the CLI: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

``auto`` (the CLI default) means the GPU when the backend in use can reach one: torch when
``torch.cuda.is_available()``, onnxruntime when it has the CUDA provider and the NVIDIA driver reports a
GPU, TensorRT always (an engine only runs on a GPU). Explicit devices are checked the same way, so a
missing GPU is one clear line, not a failure deep inside a runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from dataclasses import dataclass

from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)

AUTO = "auto"
RUNTIMES = ("torch", "ort", "trt")
_SYNTAX = re.compile(r"(cpu|cuda)(?::(\d+))?")


class DeviceError(CpmError):
    """A device string that names no device, or a device the runtime cannot use here."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:  # the spelling torch and the CLI accept
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def parse_device(text: str | Device) -> Device:
    """``cpu`` | ``cuda`` | ``cuda:N`` -> Device (syntax only; ``auto`` needs :func:`resolve_device`)."""
    if isinstance(text, Device):
        return text
    match = _SYNTAX.fullmatch(text.strip().lower())
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        hint = " (auto depends on the runtime: use resolve_device)" if text.strip().lower() == AUTO else ""
        raise DeviceError(f"--device {text!r} is not a CUDA device, cpu or auto; use auto, cpu, cuda or cuda:N{hint}")
    return Device(match.group(1), int(match.group(2) or 0))


def resolve_device(text: str | Device, runtime: str) -> Device:
    """The device ``runtime`` (torch, ort or trt) runs on for ``text``; ``auto`` picks its GPU when it has one."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    if isinstance(text, str) and text.strip().lower() == AUTO:
        if runtime == "trt" or gpu_count(runtime) > 0:
            return Device("cuda", 0)
        return CPU
    device = parse_device(text)
    if runtime == "trt":
        if not device.is_cuda:  # kept lenient: a library call with the old default "cpu" still runs the engine
            log.warning("TensorRT engines run on a GPU; using cuda:0 instead of --device cpu")
            return Device("cuda", 0)
        return device
    if device.is_cuda:
        count = gpu_count(runtime)
        if count == 0:
            raise DeviceError(f"--device {device} was asked for but {_no_gpu_reason(runtime)}")
        if device.index >= count:
            raise DeviceError(f"--device {device} was asked for but {runtime} sees only {count} GPU(s)")
    return device


def resolve_for_all(text: str | Device, runtimes: tuple[str, ...]) -> Device:
    """One device that every runtime in ``runtimes`` can use (``auto``: the GPU only if all of them reach it)."""
    devices = {resolve_device(text, runtime) for runtime in runtimes}
    return devices.pop() if len(devices) == 1 else CPU


def gpu_count(runtime: str) -> int:
    """GPUs ``runtime`` can use here (0 when its package or the NVIDIA driver is missing)."""
    if runtime == "torch":
        try:
            import torch
        except ImportError:
            return 0
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if runtime == "ort":
        try:
            import onnxruntime as ort
        except ImportError:
            return 0
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return 0  # the CPU package, or a GPU package built without CUDA
        return driver_gpu_count()
    return driver_gpu_count()


def driver_gpu_count() -> int:
    """GPUs the NVIDIA driver reports (CUDA driver API through ctypes: no torch, no cuda-python needed).

    onnxruntime-gpu lists its CUDA provider even on a machine without a GPU, so ``auto`` asks the driver."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _no_gpu_reason(runtime: str) -> str:
    if runtime == "torch":
        return "torch sees no CUDA GPU"
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'cpm-infer[ort-gpu]')"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDA provider "
            "(install cpm-infer[ort-gpu] on a machine with an NVIDIA GPU)"
        )
    return "onnxruntime found no usable CUDA GPU (the NVIDIA driver reports none)"
