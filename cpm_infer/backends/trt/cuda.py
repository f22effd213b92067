"""The few CUDA runtime calls the TensorRT path needs, through NVIDIA's cuda-python.

Why cuda-python and not torch or pycuda: an engine artifact must run without torch (a multi-GB
dependency that would also bring its own CUDA context and allocator); pycuda compiles against the
local toolkit at install time. cuda-python is NVIDIA's thin binding of the CUDA runtime, the one the
TensorRT Python samples use, and installs as a wheel. Its module moved: ``cuda.bindings.runtime``
(cuda-python >= 12.6) and ``cuda.cudart`` (older, removed in 13); both are accepted.

Every call returns ``(error, *results)``; ``call`` turns an error into a one-line CudaError.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cpm_infer.deps import MissingDependencyError
from cpm_infer.errors import CpmError


class CudaError(CpmError):
    """A CUDA runtime call failed (no GPU, no driver, out of memory, ...)."""


def runtime() -> ModuleType:
    """The cuda-python runtime module, or a one-line error naming the ``tensorrt`` extra."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("cuda-python is not available; install it with: pip install 'cpm-infer[tensorrt]'")


# cuda-python links its CUDA runtime statically: cuda-python 13 needs a CUDA 13 driver (R580+) even when
# TensorRT is a CUDA 12 build. The extras pair them (README, "TensorRT per GPU").
_HINTS = {
    "cudaErrorInsufficientDriver": (
        "; the NVIDIA driver is older than this cuda-python's CUDA runtime: install the CUDA 12 pair "
        "(pip install 'cpm-infer[tensorrt]') or update the driver"
    ),
}


def call(result: Any, what: str) -> Any:
    """Check a cuda-python ``(err, *values)`` result; return the value(s)."""
    rt = runtime()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        hint = _HINTS.get(name, "")
        raise CudaError(f"CUDA {what} failed: {name} ({text}){hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int


def gpu_info(index: int = 0) -> GpuInfo:
    rt = runtime()
    count = call(rt.cudaGetDeviceCount(), "device query (is an NVIDIA driver installed?)")
    if index >= count:
        raise CudaError(f"GPU {index} requested but only {count} CUDA device(s) are visible")
    props = call(rt.cudaGetDeviceProperties(index), f"properties of GPU {index}")
    raw = props.name
    name = (raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
    return GpuInfo(index, name, (int(props.major), int(props.minor)), int(props.totalGlobalMem))


class DeviceBuffer:
    """``nbytes`` of device memory (at least 1 byte: TensorRT needs a non-null address even for an
    empty tensor)."""

    def __init__(self, nbytes: int, what: str) -> None:
        self.nbytes = max(1, int(nbytes))
        self.ptr = int(
            call(runtime().cudaMalloc(self.nbytes), f"allocation of {self.nbytes / 2**20:.1f} MiB for {what}")
        )

    def free(self) -> None:
        if self.ptr:
            runtime().cudaFree(self.ptr)
            self.ptr = 0


class PinnedArray:
    """A numpy array in page-locked host memory, so async copies really overlap and never stage."""

    def __init__(self, count: int, dtype: np.dtype | type, what: str) -> None:
        dtype = np.dtype(dtype)
        nbytes = max(1, count) * dtype.itemsize
        self.ptr = int(call(runtime().cudaMallocHost(nbytes), f"pinned host allocation for {what}"))
        buffer = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(buffer, dtype=dtype, count=max(1, count))

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0)
            runtime().cudaFreeHost(self.ptr)
            self.ptr = 0
