"""One execution context per optimization profile (prefill, decode), sharing one scratch buffer.

Why not one context switching profiles: ``setOptimizationProfileAsync`` "will trigger layer resource
updates on the next call of executeV2()/enqueueV3(), possibly resulting in performance bottlenecks"
(NvInferRuntime.h), and generation alternates prefill and decode on every request. NVIDIA's GPT-2 demo
(demo/HuggingFace/GPT2/trt.py) likewise keeps a second context for its second profile. Each context
here selects its profile once, at load.

Why shared scratch: a context allocates its activation memory unless the application provides it
(``setDeviceMemory``/``setDeviceMemoryV2``), and TensorRT only forbids using that memory from "another
execution context running in parallel" (NvInferRuntime.h). Our two contexts run one after the other on
one stream, so they share one buffer of the engine's maximum over all profiles.

The Python API differs by release (pyCore.cpp):

- 8.6: ``create_execution_context_without_device_memory()``, ``engine.device_memory_size``,
  ``context.device_memory = ptr``.
- 10.x/11.x: ``create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)`` (the
  former is deprecated in 10, gone in 11); from 10.1 ``engine.device_memory_size_v2`` and
  ``context.set_device_memory(ptr, size)`` supersede the old size and setter.

``set_optimization_profile_async`` returns True or raises ``RuntimeError`` ("Error in set optimization
profile async.", ``PY_ASSERT_RUNTIME_ERROR`` in pyCore.cpp since 8.6): it never returns False.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cpm_infer.errors import CpmError, first_line


class ContextError(CpmError):
    """TensorRT could not create or configure an execution context."""


def scratch_size(engine: Any) -> int:
    """Bytes of activation memory that any one profile's execution needs."""
    size = getattr(engine, "device_memory_size_v2", None)  # 10.1+
    return int(engine.device_memory_size if size is None else size)


def context_without_memory(trt: Any, engine: Any) -> Any:
    """An execution context whose device memory the application will provide."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:  # 10.0+
        context = engine.create_execution_context(strategy.USER_MANAGED)
    else:
        context = engine.create_execution_context_without_device_memory()
    if context is None:
        raise ContextError("TensorRT could not create an execution context (see its log above)")
    return context


def give_memory(context: Any, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # 10.1+
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


def select_profile(context: Any, profile: int, stream: int, name: str) -> None:
    """Bind ``context`` to ``profile`` for good (a one-line error instead of TensorRT's RuntimeError)."""
    try:
        context.set_optimization_profile_async(profile, stream)
    except RuntimeError as exc:
        raise ContextError(
            f"TensorRT refused the {name} optimization profile ({profile}): {first_line(exc)}; see its log above"
        ) from exc


def profile_contexts(
    trt: Any, engine: Any, names: list[str], stream: int, allocate: Callable[[int, str], int]
) -> list[Any]:
    """One context per profile (``names[i]`` for profile i), all on one scratch buffer from ``allocate``."""
    size = scratch_size(engine)
    scratch = allocate(size, "TensorRT activations")
    contexts = []
    for profile, name in enumerate(names):
        context = context_without_memory(trt, engine)
        give_memory(context, scratch, size)
        select_profile(context, profile, stream, name)
        contexts.append(context)
    return contexts
