"""The process's one shared onnxruntime thread pool (``set_global_thread_pool_sizes``), for sessions that take
turns on the same cores (speculative decoding's model and draft). Kept apart from ``ort_backend`` so that the
``cpm`` entry point can allow it without importing numpy."""

from __future__ import annotations

import logging
from typing import Any

from cpm_infer.deps import require
from cpm_infer.errors import first_line

log = logging.getLogger(__name__)

_pool: dict[str, int] = {}  # "allowed": 1 once allowed; "threads": the shared pool's size once made (-1: unknown)


def allow_shared_pool() -> None:
    """This process is cpm-infer's own (the ``cpm`` command, a benchmark script): onnxruntime sessions that take
    turns on the same cores may move to one shared pool (``claim_shared_pool``). Not the default, because once
    that pool exists onnxruntime refuses every session with threads of its own, a library user's included."""
    _pool["allowed"] = 1


def claim_shared_pool(threads: int | None) -> bool:
    """Whether sessions of ``threads`` intra-op threads (None: onnxruntime's default) can run on the process's
    one shared onnxruntime pool (``set_global_thread_pool_sizes``), where ``allow_shared_pool`` was called: it
    is sized by the first claim and cannot change afterwards, so a claim with another size is refused. Every
    session this process opens after the first claim runs on the pool (``create_session``)."""
    if not _pool.get("allowed"):
        return False
    size = threads or 0
    if "threads" not in _pool:
        ort = require("onnxruntime", "ort")
        state = getattr(getattr(ort, "capi", None), "_pybind_state", None)
        setter = getattr(state, "set_global_thread_pool_sizes", None)
        if setter is None:  # an onnxruntime without it: per-session threads, as before
            return False
        try:
            setter(size, 1)
        except Exception as exc:  # noqa: BLE001 - ORT's own type: pools made elsewhere, size unknown
            log.info("onnxruntime's shared thread pool is not available: %s", first_line(exc))
            _pool["threads"] = -1
            return False
        _pool["threads"] = size
    return _pool["threads"] == size


def shared_pool_size() -> int | None:
    """The shared pool's size once claimed (0: onnxruntime's default, -1: made by someone else), else None."""
    return _pool.get("threads")


def session_options(ort: Any, threads: int | None = None) -> Any:
    """``SessionOptions`` for a session of ours: on the shared pool once it exists (onnxruntime refuses any other
    session then, the small helper graphs' included), else a sequential graph on ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    pool = shared_pool_size()
    if pool is not None:
        if threads and pool not in (threads, -1):
            log.warning("a session asked for %d threads runs on the process's shared pool of %s", threads, pool)
        options.use_per_session_threads = False
    else:
        options.inter_op_num_threads = 1  # one graph, sequential: parallelism is inside the kernels
        if threads:
            options.intra_op_num_threads = threads
    return options
