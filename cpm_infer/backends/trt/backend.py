"""TensorRT backend: one engine with a prefill and a decode profile, one execution context per profile
sharing one scratch buffer (``contexts``), the named-tensor API (TensorRT >= 8.6: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), one CUDA stream, and every buffer allocated once at load.

Threads. The current CUDA device is a property of the calling host thread (``cudaSetDevice`` "sets
device as the current device for the calling host thread", CUDA Runtime API), and the server calls
backends from worker threads. So every public method that touches CUDA first makes this backend's GPU
current on the calling thread (a cheap call); otherwise ``cuda:1`` would enqueue from a thread whose
device is 0. Calls are not concurrent: one caller at a time.

KV cache. The graph's contract is ``present = concat(past, new)``, written as a contiguous
(B, nh, P+1, hs) tensor. A present cannot alias its own past: row b of the past starts at
``b*nh*P*hs``, of the present at ``b*nh*(P+1)*hs``, so writing one over the other races (and
TensorRT does not allow an output to overlap an input). So each layer's key and value have two
buffers sized for (max_batch, nh, max_total, hs): step t reads the past from set ``cur`` and writes
the present into set ``1 - cur``; the next step swaps. Nothing is allocated per step; the price is
the concat the graph does anyway (O(context) bytes per token, see the README's decode benchmarks).
Dropping finished rows (``select``) gathers the kept rows into the other set with one device copy
per run of consecutive rows per tensor (a 2-D copy when leading padding is cut too), and swaps.

Joining (``merge``). A prefill writes its cache into a third, smaller set (staging, sized for the
prefill profile), so it never touches the running batch's set. ``merge`` then copies the running
rows and the new rows into the free set, left-padding the shorter ones (``cudaMemset2DAsync`` zeroes
the padding, ``cudaMemcpy2DAsync`` places each run of rows), once per join; a fresh prefill that is
decoded directly reads its past from staging. A state names its set (``cur``, -1 = staging) and an
epoch, so a state whose buffers were reused since is refused instead of read.

Logits. The graph returns logits for every position; only the last one per row is copied back
(one strided ``cudaMemcpy2DAsync`` into pinned memory), then the stream is synchronised once.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpm_infer import kv
from cpm_infer.backends.base import BackendClosedError
from cpm_infer.backends.trt import cuda
from cpm_infer.backends.trt.compat import RuntimeInfo, cc_string, check_engine_compatible
from cpm_infer.backends.trt.contexts import profile_contexts
from cpm_infer.backends.trt.logger import get_logger
from cpm_infer.backends.trt.profiles import (
    DECODE,
    PREFILL,
    PROFILE_NAMES,
    EngineLimits,
    Profile,
    ProfileError,
    check_fits,
)
from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.devices import Device, resolve_device
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)


class TrtBackendError(CpmError):
    """The engine cannot be loaded or run, or a call does not fit it."""


STAGING = -1  # TrtState.cur of a cache still in the prefill (staging) buffers


@dataclass(frozen=True)
class TrtState:
    """Where the KV cache is: which buffer set (0, 1 or STAGING), how many rows and positions, and
    the epoch of those buffers (a later prefill reuses staging; a later fresh decode reuses the sets)."""

    epoch: int
    batch: int
    length: int
    cur: int


def copy_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(source row, destination row, count) runs gathering ``rows`` (repeats allowed) into rows 0..len-1."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(int(r) for r in rows):
        if runs and runs[-1][0] + runs[-1][2] == src:
            s, d, n = runs[-1]
            runs[-1] = (s, d, n + 1)
        else:
            runs.append((src, dst, 1))
    return runs


class TrtBackend:
    name = "trt"

    def __init__(
        self,
        engine_bytes: bytes | mmap.mmap,
        spec: ModelSpec,
        limits: EngineLimits,
        profiles: list[Profile],
        *,
        device: int = 0,
    ) -> None:
        trt = require("tensorrt", "tensorrt")
        self._trt, self._rt = trt, cuda.runtime()
        self._buffers: list = []
        self.model_spec, self.limits, self.profiles = spec, limits, profiles
        # The loop stops a sequence at spec.n_positions: make that the engine's max total length.
        self.spec = ModelSpec(spec.n_layer, spec.n_head, spec.n_embd, spec.vocab_size, limits.max_total)
        self.device_index = device
        try:
            self._load(trt, engine_bytes)
        except BaseException:
            self.close()  # a failed load frees what it allocated now, not at some later garbage collection
            raise
        self.max_batch = limits.max_batch  # the engine never runs more rows than this
        self.max_prompt = limits.max_input  # the prefill profile's longest prompt
        self._epoch, self._sets_epoch = 0, 0

    def _load(self, trt, engine_bytes: bytes | mmap.mmap) -> None:
        self._on_device()
        self._logger = get_logger(trt)  # TensorRT messages go to logging, not stderr
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise TrtBackendError("TensorRT could not deserialize the engine (see its log above)")
        self._check_engine()
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in self._io_names()}
        if self._dtypes[kv.LOGITS] != np.float32:  # the host buffers and copies below assume 4-byte logits
            raise TrtBackendError(
                f"the engine returns {self._dtypes[kv.LOGITS]} logits, expected float32: rebuild it with cpm export trt"
            )
        self._stream = cuda.call(self._rt.cudaStreamCreate(), "stream creation")
        self._stream_handle = int(self._stream)
        self._contexts = profile_contexts(trt, self._engine, list(PROFILE_NAMES), self._stream_handle, self._device)
        self._allocate()

    # -- setup -----------------------------------------------------------------------------------
    def _on_device(self) -> None:
        """Make this backend's GPU current on the calling thread (see the module docstring)."""
        cuda.call(self._rt.cudaSetDevice(self.device_index), f"selecting GPU {self.device_index}")

    def _io_names(self) -> list[str]:
        return [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]

    def _check_engine(self) -> None:
        n = self.spec.n_layer
        names = set(self._io_names())
        want = set(kv.input_names(n)) | set(kv.output_names(n))
        if names != want:
            raise TrtBackendError(
                f"engine IO does not follow the KV contract for {n} layers ({len(names)} tensors, expected {len(want)})"
            )
        if self._engine.num_optimization_profiles != 2:
            raise TrtBackendError(
                f"engine has {self._engine.num_optimization_profiles} optimization profiles, expected 2 "
                "(prefill, decode)"
            )
        top = self._engine.get_tensor_profile_shape(kv.ATTENTION_MASK, DECODE)[2]
        if int(top[1]) != self.limits.max_total or int(top[0]) != self.limits.max_batch:
            raise TrtBackendError(f"engine profile max {tuple(top)} disagrees with the manifest limits {self.limits}")

    def _device(self, nbytes: int, what: str) -> int:
        buf = cuda.DeviceBuffer(nbytes, what)
        self._buffers.append(buf)
        return buf.ptr

    def _pinned(self, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        buf = cuda.PinnedArray(count, dtype, what)
        self._buffers.append(buf)
        return buf.array

    def _allocate(self) -> None:
        b, t, total, s = self.limits.max_batch, self.limits.max_input, self.limits.max_total, self.spec
        self._in_dev, self._in_host = {}, {}
        for name, width in ((kv.INPUT_IDS, t), (kv.POSITION_IDS, t), (kv.ATTENTION_MASK, total)):
            dt = self._dtypes[name]
            self._in_dev[name] = self._device(b * width * dt.itemsize, name)
            self._in_host[name] = self._pinned(b * width, dt, name)
        self._logits_dev = self._device(b * t * s.vocab_size * 4, "logits")  # prefill: every position
        self._logits_host = self._pinned(b * s.vocab_size, np.float32, "logits")
        self._kv_dtype = self._dtypes[kv.past_names(s.n_layer)[0]]
        per_tensor = b * s.n_head * total * s.head_dim * self._kv_dtype.itemsize
        self._kv = [[self._device(per_tensor, "KV cache") for _ in range(2 * s.n_layer)] for _ in range(2)]
        staging = b * s.n_head * t * s.head_dim * self._kv_dtype.itemsize
        self._staging = [self._device(staging, "KV staging") for _ in range(2 * s.n_layer)]
        log.info(
            "TensorRT backend: %.1f MiB of KV buffers (2 sets + staging)",
            2 * s.n_layer * (2 * per_tensor + staging) / 2**20,
        )

    def close(self) -> None:
        """Free device memory, the execution context and the engine now (also done at garbage collection);
        idempotent. Later calls raise BackendClosedError instead of touching freed buffers."""
        self._closed = True
        if getattr(self, "_buffers", None) or getattr(self, "_stream", None) is not None:
            self._on_device()  # garbage collection may run this on any thread
        if getattr(self, "_stream", None) is not None:
            self._rt.cudaStreamSynchronize(self._stream)
        for buf in getattr(self, "_buffers", []):
            buf.free()
        self._buffers = []
        if getattr(self, "_stream", None) is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None
        self._contexts, self._engine = [], None  # the contexts before the engine they came from

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown may have torn down cuda-python already
            pass

    # -- one step --------------------------------------------------------------------------------
    def _stage(self, name: str, array: np.ndarray) -> None:
        host = self._in_host[name][: array.size]
        host[:] = array.reshape(-1)  # casts int64 -> int32 when TensorRT 8.x made the input int32
        cuda.call(
            self._rt.cudaMemcpyAsync(
                self._in_dev[name],
                host.ctypes.data,
                host.nbytes,
                self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                self._stream_handle,
            ),
            f"copy of {name}",
        )

    def _run(
        self,
        profile: int,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past_len: int,
        past_bufs: list[int],
        out_bufs: list[int],
    ) -> np.ndarray:
        ctx, s = self._contexts[profile], self.spec  # each context was bound to its profile at load
        batch, seq = ids.shape
        ok = True  # set_input_shape/set_tensor_address return False (and log why) on a bad binding
        for name, array in ((kv.INPUT_IDS, ids), (kv.ATTENTION_MASK, mask), (kv.POSITION_IDS, pos)):
            self._stage(name, array)
            ok &= ctx.set_input_shape(name, array.shape) and ctx.set_tensor_address(name, self._in_dev[name])
        past_shape = kv.kv_shape(s, batch, past_len)
        for i, (past, present) in enumerate(zip(kv.past_names(s.n_layer), kv.present_names(s.n_layer), strict=True)):
            ok &= ctx.set_input_shape(past, past_shape) and ctx.set_tensor_address(past, past_bufs[i])
            ok &= ctx.set_tensor_address(present, out_bufs[i])
        ok &= ctx.set_tensor_address(kv.LOGITS, self._logits_dev)
        if not ok:
            raise TrtBackendError(
                f"TensorRT refused the bindings (batch {batch}, seq {seq}, past {past_len}); see the log"
            )
        if not ctx.execute_async_v3(self._stream_handle):
            raise TrtBackendError(f"TensorRT execution failed (batch {batch}, seq {seq}, past {past_len})")
        row = s.vocab_size * 4
        cuda.call(
            self._rt.cudaMemcpy2DAsync(
                self._logits_host.ctypes.data,
                row,
                self._logits_dev + (seq - 1) * row,
                seq * row,
                row,
                batch,
                self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                self._stream_handle,
            ),
            "copy of logits",
        )
        cuda.call(self._rt.cudaStreamSynchronize(self._stream_handle), "TensorRT step")
        return self._logits_host[: batch * s.vocab_size].reshape(batch, s.vocab_size).copy()

    # -- Backend protocol --------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        batch, seq = input_ids.shape
        if attention_mask.shape != (batch, seq) or position_ids.shape != (batch, seq):
            raise TrtBackendError(
                f"prefill: mask {attention_mask.shape} / positions {position_ids.shape} do not match ids "
                f"{input_ids.shape}"
            )
        self._fit(PREFILL, batch, seq, 0)
        self._on_device()
        self._epoch += 1
        # The (empty) past is bound to set 1's buffers: any valid address, nothing is read.
        logits = self._run(PREFILL, input_ids, attention_mask, position_ids, 0, self._kv[1], self._staging)
        return logits, TrtState(self._epoch, batch, seq, cur=STAGING)

    def decode(self, state: TrtState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        self._check_state(state)
        batch = input_ids.shape[0]
        if input_ids.shape != (state.batch, 1) or attention_mask.shape != (batch, state.length + 1):
            raise TrtBackendError(
                f"decode: ids {input_ids.shape} / mask {attention_mask.shape} do not follow the state "
                f"(batch {state.batch}, past {state.length})"
            )
        self._fit(DECODE, batch, 1, state.length)
        self._on_device()
        src, out, epoch = self._source(state), self._target(state), self._epoch_after(state)
        logits = self._run(DECODE, input_ids, attention_mask, position_ids, state.length, src, self._kv[out])
        return logits, TrtState(epoch, batch, state.length + 1, cur=out)

    def select(self, state: TrtState, rows: np.ndarray, *, start: int = 0) -> TrtState:
        self._check_state(state)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= state.batch:
            raise TrtBackendError(f"select: rows {rows.tolist()} are not rows of a batch of {state.batch}")
        if not 0 <= start < state.length:
            raise TrtBackendError(f"select: start {start} is outside a cache of {state.length} positions")
        if start == 0 and np.array_equal(rows, np.arange(state.batch)):
            return state
        self._on_device()
        src, out, epoch = self._source(state), self._target(state), self._epoch_after(state)
        length = state.length - start
        for first, to, count in copy_runs(rows):
            self._place(src, first, state.length, start, self._kv[out], to, length, count)
        return TrtState(epoch, int(rows.size), length, cur=out)

    def merge(self, state: TrtState, other: TrtState) -> TrtState:
        """Running rows (one set) + newly prefilled rows (staging) into the free set, left-padded."""
        for s in (state, other):
            self._check_state(s)
        sets = [s.cur for s in (state, other) if s.cur != STAGING]
        if len(sets) != 1:
            raise TrtBackendError("merge: expected one running state and one fresh prefill")
        batch, length = state.batch + other.batch, max(state.length, other.length)
        if batch > self.limits.max_batch:
            raise TrtBackendError(
                f"merge: {batch} rows exceed the engine's batch limit of {self.limits.max_batch} (--max-batch)"
            )
        self._on_device()
        out = 1 - sets[0]
        row = 0
        for part in (state, other):
            self._place(self._source(part), 0, part.length, 0, self._kv[out], row, length, part.batch)
            row += part.batch
        epoch = state.epoch if state.cur != STAGING else other.epoch
        return TrtState(epoch, batch, length, cur=out)

    # -- KV buffer bookkeeping ------------------------------------------------------------------------
    def _source(self, state: TrtState) -> list[int]:
        return self._staging if state.cur == STAGING else self._kv[state.cur]

    @staticmethod
    def _target(state: TrtState) -> int:
        return 0 if state.cur == STAGING else 1 - state.cur

    def _epoch_after(self, state: TrtState) -> int:
        """A state leaving staging becomes the sets' new occupant: older set states turn stale."""
        if state.cur != STAGING:
            return state.epoch
        self._sets_epoch += 1
        return self._sets_epoch

    def _place(
        self, src: list[int], first: int, src_len: int, start: int, dst: list[int], to: int, dst_len: int, count: int
    ) -> None:
        """Copy ``count`` rows from row ``first`` of ``src`` (length ``src_len``, from position ``start``)
        to row ``to`` of ``dst`` (length ``dst_len``), right-aligned; the padding in front is zeroed."""
        s, item = self.spec, self._kv_dtype.itemsize
        line = s.head_dim * item  # one position of one head
        kept = src_len - start
        pad = dst_len - kept
        lines = count * s.n_head  # (row, head) pairs: each is a contiguous run of positions
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for i in range(2 * s.n_layer):
            base = dst[i] + to * s.n_head * dst_len * line
            if pad:
                cuda.call(
                    self._rt.cudaMemset2DAsync(base, dst_len * line, 0, pad * line, lines, self._stream_handle),
                    "KV padding",
                )
            cuda.call(
                self._rt.cudaMemcpy2DAsync(
                    base + pad * line,
                    dst_len * line,
                    src[i] + (first * s.n_head * src_len + start) * line,
                    src_len * line,
                    kept * line,
                    lines,
                    kind,
                    self._stream_handle,
                ),
                "KV row gather",
            )

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise BackendClosedError("the TensorRT backend is closed")

    def _fit(self, profile: int, batch: int, seq: int, past: int) -> None:
        self._check_open()
        try:
            check_fits(self.profiles[profile], batch=batch, seq=seq, past=past)
        except ProfileError as exc:
            raise TrtBackendError(str(exc)) from exc

    def _check_state(self, state: TrtState) -> None:
        self._check_open()
        current = self._epoch if isinstance(state, TrtState) and state.cur == STAGING else self._sets_epoch
        if not isinstance(state, TrtState) or state.epoch != current:
            raise TrtBackendError("stale TensorRT state: a later prefill or generation has reused its KV buffers")


def load(path, *, device: str | Device = "auto", tokenizer_file=None, threads: int | None = None):
    """Open an engine artifact (``manifest.json`` with ``"format": "tensorrt"``)."""
    from cpm_infer.artifact import read_manifest
    from cpm_infer.checkpoint import check_tokenizer_fits
    from cpm_infer.tokenizer import CpmTokenizer

    path = Path(path)
    manifest = read_manifest(path, expected_format="tensorrt")
    tokenizer = CpmTokenizer(Path(tokenizer_file) if tokenizer_file else path / manifest.tokenizer_file)
    # before the GPU work, as the ORT loader does
    check_tokenizer_fits(tokenizer.vocab_size, manifest.spec, path, tokenizer.path)
    index = resolve_device(device, "trt").index
    trt = require("tensorrt", "tensorrt")
    gpu = cuda.gpu_info(index)
    check_engine_compatible(manifest.details, RuntimeInfo(trt.__version__, gpu.name, cc_string(gpu.compute_capability)))
    limits = EngineLimits.from_dict(manifest.details.get("limits", {}))
    profiles = [Profile.from_dict(p) for p in manifest.details.get("profiles", [])]
    if len(profiles) != 2:
        raise TrtBackendError(f"{path}: manifest lists {len(profiles)} profiles, expected prefill and decode")
    if threads:
        log.debug("--threads does not apply to the TensorRT backend")
    # Memory-mapped, not read: TensorRT copies the engine to the GPU, and a CPM-large fp32 engine is ~10 GB.
    with (
        open(path / manifest.graph_files["model"], "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as engine,
    ):
        backend = TrtBackend(engine, manifest.spec, limits, profiles, device=index)
    return backend, tokenizer
