"""ONNX Runtime backend: runs an exported artifact (``cpm export onnx``) on the CPU or CUDA provider.

Needs numpy and onnxruntime only (no torch). With IO binding (the default) each generation owns two
flat KV buffers per past/present tensor and ping-pongs between them: step t reads its past from one
and the graph writes present = concat(past, new) into the other, as a prefix of that flat buffer
(a contiguous (B, nh, L, hs) array), so nothing is allocated per step and, on CUDA, the cache never
leaves the device. Buffers grow geometrically, so a long generation reallocates O(log n) times.

Artifacts whose manifest says ``kv_cache: shared`` (attention as GroupQueryAttention, see
``export.kv_share``) write the new key/value in place on the CPU: one (B, nh, capacity, hs) buffer per
past/present pair is bound as both, so a decode step copies nothing of the past.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer import kv
from cpm_infer.artifact import Manifest, ManifestError, read_manifest
from cpm_infer.backends.base import BackendClosedError
from cpm_infer.backends.ort_gather import RowGather
from cpm_infer.backends.ort_kv_ops import KvOps
from cpm_infer.checkpoint import check_tokenizer_fits
from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.devices import Device, parse_device, resolve_device
from cpm_infer.errors import CpmError, first_line
from cpm_infer.ort_pool import claim_shared_pool, session_options
from cpm_infer.tokenizer import CpmTokenizer

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
ROW_SLOTS = 4  # shared KV buffers hold rows in multiples of this: rows joining one by one reallocate every 4th time
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
# logits_to_keep feeds; module constants, so a bound input's memory outlives every run that reads it
_KEEP_LAST, _KEEP_ALL = kv.keep_feed(last=True), kv.keep_feed(last=False)


class OrtDeviceError(CpmError):
    """The requested device cannot be used by onnxruntime here."""


class OrtLoadError(CpmError):
    """onnxruntime cannot load or run the graph."""


def cuda_provider_options(index: int, *, tf32: bool = False) -> dict[str, str]:
    """Options of ONNX Runtime's CUDA provider. ``use_tf32`` defaults to 1 there (float32 MatMul/GEMM in
    TF32 on sm_80+, 10-bit mantissa inputs): we pass 0 unless asked, so a float32 artifact computes in
    float32 like eager PyTorch (whose TF32 matmul default is off) and the export validation's float32
    tolerance holds. Float16 artifacts are unaffected. The arena grows by what is asked rather than by
    doubling, so a multi-GB model does not reserve up to twice its size. Values are strings, as ORT parses them."""
    return {
        "device_id": str(index),
        "use_tf32": "1" if tf32 else "0",
        "arena_extend_strategy": "kSameAsRequested",
    }


def create_session(
    graph: Path,
    *,
    device: str | Device = "cpu",
    threads: int | None = None,
    tf32: bool = False,
    spinning: bool = True,
) -> Any:
    """An InferenceSession on ``device`` (``auto``: the CUDA provider when there is a GPU); one-line errors
    for a missing provider or a bad graph. ``tf32`` lets the CUDA provider run float32 GEMMs in TF32
    (faster on sm_80+, ~1e-3 relative error). ``spinning=False``: the intra-op threads stop spinning when a run
    ends (they still spin between the kernels of a run; ``OrtBackend.quiet_threads``). Once the process's shared
    pool exists (``cpm_infer.ort_pool``), the session runs on it.

    Opened by path, so ORT finds external data files beside the graph; on the CPU it memory-maps
    external tensors stored at aligned offsets (``export.onnx_weights``) instead of reading them."""
    ort = require("onnxruntime", "ort-gpu" if str(device).startswith("cuda") else "ort")
    target = resolve_device(device, "ort")
    providers: list[Any] = ["CPUExecutionProvider"]
    if target.is_cuda:
        providers.insert(0, ("CUDAExecutionProvider", cuda_provider_options(target.index, tf32=tf32)))
    options = session_options(ort, threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if target.is_cuda:  # weights in plain device allocations, outside the arena (ORT's advice for large models)
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if not spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types; report one line
        raise OrtLoadError(f"onnxruntime cannot load {graph}: {first_line(exc)}") from exc
    if target.is_cuda and session.get_providers()[0] != "CUDAExecutionProvider":
        raise OrtDeviceError(f"--device {target} was asked for but onnxruntime found no usable CUDA GPU")
    return session


def check_graph(session: Any, manifest: Manifest, where: Path) -> None:
    """The graph must have the manifest's IO names, layer count, head shape and dtype."""

    def fail(detail: str) -> None:
        raise ManifestError(f"{where}: the manifest does not match the graph: {detail}")

    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if list(inputs) != manifest.inputs or list(outputs) != manifest.outputs:
        graph_layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        missing = [n for n in manifest.inputs + manifest.outputs if n not in inputs and n not in outputs]
        fail(
            f"graph has {graph_layers} KV layers and {len(inputs)} inputs / {len(outputs)} outputs, manifest says "
            f"{manifest.spec.n_layer} layers" + (f" (missing {missing[0]})" if missing else "")
        )
    spec = manifest.spec
    for name in kv.past_names(spec.n_layer)[:2]:
        shape, dtype = inputs[name].shape, inputs[name].type
        if shape[1] != spec.n_head or shape[3] != spec.head_dim:
            fail(f"{name} has shape {shape}, manifest says {spec.n_head} heads of size {spec.head_dim}")
        if dtype != _ORT_TYPES[manifest.dtype]:
            fail(f"{name} is {dtype}, manifest says {manifest.dtype}")
    vocab = outputs[kv.LOGITS].shape[-1]
    if isinstance(vocab, int) and vocab != spec.vocab_size:
        fail(f"logits have {vocab} columns, manifest says vocab_size {spec.vocab_size}")


@dataclass
class OrtState:
    """The KV cache of one generation: ``batch`` rows holding ``past`` tokens each."""

    batch: int
    past: int
    arrays: list[np.ndarray] = field(default_factory=list)  # without IO binding: host presents
    buffers: list[list[Any]] = field(default_factory=list)  # with IO binding: a [A, B] pair per KV name
    sizes: list[list[int]] = field(default_factory=list)  # element capacity of each buffer
    current: int = 0  # which buffer of each pair holds the cache
    capacity: int = 0  # shared KV mode: sequence slots of each (B, nh, capacity, hs) buffer
    binding: Any = None
    logits: np.ndarray | None = None  # reused host logits buffer (flat)
    bound: tuple[Any, ...] | None = None  # shared KV mode: what the binding's KV/logits outputs point at


class OrtBackend:
    name = "ort"

    def __init__(
        self,
        session: Any,
        spec: ModelSpec,
        *,
        dtype: str = "float32",
        device: str | Device = "cpu",
        io_binding: bool = True,
        kv_shared: bool = False,
    ) -> None:
        self._ort = require("onnxruntime", "ort")
        self._session, self.spec, self.dtype = session, spec, dtype
        self.np_dtype = _NP_DTYPES[dtype]
        target = parse_device(device)  # the session's device (already resolved by create_session)
        self.device_kind, self.device_id = target.kind, target.index
        self.io_binding = io_binding
        # In-place KV writes need the graph's support (manifest) and host buffers (the CPU provider).
        self.gqa = kv_shared  # the graph's attention is GroupQueryAttention (export.kv_share)
        self.kv_shared = kv_shared and io_binding and self.device_kind == "cpu"
        # KV buffers: numpy arrays on the CPU provider, OrtValues on the session's device otherwise.
        self._device_buffers = self.device_kind != "cpu"
        self._gather: RowGather | None = None
        self._ops: KvOps | None = None
        # reserve(): one set of shared KV buffers at full context, lent to one running batch at a time
        self._reserve: list[np.ndarray] = []
        self._reserve_owner: Callable[[], OrtState | None] = lambda: None
        self.past_names = kv.past_names(spec.n_layer)
        self.present_names = kv.present_names(spec.n_layer)
        # Graphs with logits_to_keep compute the LM head at the last position only, unless asked for every one.
        self.keep = kv.keeps_logits([i.name for i in session.get_inputs()])
        # create_session with the arguments this session was made with (``load`` sets it): quiet_threads reopens
        self.reopen: Callable[..., Any] | None = None
        self.threads: int | None = None  # intra-op threads the session was made with (``load`` sets it)

    @property
    def session(self) -> Any:
        if self._session is None:
            raise BackendClosedError("the onnxruntime backend is closed")
        return self._session

    def quiet_threads(self) -> None:
        """Reopen the session with intra-op threads that stop spinning when a run ends
        (``session.force_spinning_stop``). Where two sessions take turns on the same cores (speculative
        decoding's model and draft), each one's pool otherwise spins on through the other's run and takes its
        cores: CPM-small shape, float32 model with its int4 artifact drafting, 0.9x the model alone -> 1.4x.
        (``allow_spinning=0``, no spinning at all, gave 1.3x: every kernel then wakes sleeping threads.) Call
        before generating: states made earlier keep the old session."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        if self.reopen is not None and self.device_kind == "cpu":
            self._session = self.reopen(spinning=False)

    def join_pool(self) -> bool:
        """Reopen the session on the process's shared onnxruntime pool, where it can have one of this backend's
        thread count (``claim_shared_pool``); False: not possible here (another device, another pool size), the
        session is unchanged. Sessions that take turns on the same cores (speculative decoding's model and draft)
        then share one set of threads, which spin between runs without taking the cores from another pool:
        CPM-small shape, trained, float32 model with its int4 artifact drafting, 2 threads, 2.06x / 1.95x the
        model alone (greedy / sampled) with ``quiet_threads`` -> 2.18x / 2.03x. Call before generating."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        if self.reopen is None or self.device_kind != "cpu" or not claim_shared_pool(self.threads):
            return False
        self._session = self.reopen()  # session_options puts it on the pool just claimed
        log.info("onnxruntime session moved to the process's shared pool of %s threads", self.threads or "default")
        return True

    def close(self) -> None:
        """Drop the InferenceSessions (onnxruntime frees their weights and arenas with them)."""
        self._session = self._gather = self._ops = None
        self._reserve = []

    def reserve(self, rows: int, *, dry_run: bool = False) -> int:
        """Shared-buffer artifacts: set aside the KV buffers of a batch of ``rows`` rows at full context, touched now,
        for the running batch (the first state that a join outgrows takes them; the next one once it is gone). Rows
        then join and leave inside them and the cache never grows again, so no step of a busy server allocates and
        page-faults hundreds of MB (a growth to 1024 positions at 9 rows of CPM-small: 0.87 s on the 2-vCPU machine,
        ``benchmarks/engine_steps.py``); memory is then flat at this size. Returns the bytes set aside (0: buffers
        not shared); ``dry_run``: the bytes it would take, nothing set aside."""
        if not self.kv_shared or rows < 1:
            return 0
        shape = kv.kv_shape(self.spec, _row_slots(rows), self.spec.n_positions)
        if dry_run:
            return len(self.past_names) * int(np.prod(shape)) * np.dtype(self.np_dtype).itemsize
        self._reserve = []
        for _ in self.past_names:
            buffer = np.empty(shape, dtype=self.np_dtype)
            buffer.fill(0)  # fault the pages in now, not in a step
            self._reserve.append(buffer)
        self._reserve_owner = lambda: None
        return sum(buffer.nbytes for buffer in self._reserve)

    def _lend_reserve(self, state: OrtState, batch: int) -> bool:
        """Give ``state`` the reserved buffers if they are free (their last holder is gone, or has moved to other
        buffers) and hold ``batch`` rows."""
        if not self._reserve or self._reserve[0].shape[0] < batch:
            return False
        holder = self._reserve_owner()
        if holder is not None and holder.buffers and holder.buffers[0][0] is self._reserve[0]:
            return False
        state.buffers = [[buffer, None] for buffer in self._reserve]
        state.capacity = self.spec.n_positions
        self._reserve_owner = weakref.ref(state)
        return True

    # -- the Backend protocol -------------------------------------------------------------
    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, OrtState]:
        return self._step(self._new_state(input_ids.shape[0]), input_ids, attention_mask, position_ids)

    def decode(
        self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, OrtState]:
        return self._step(state, input_ids, attention_mask, position_ids)

    def extend(
        self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, OrtState]:
        """T new tokens per row through the same graph as decode. Every artifact kind is causal with the past's
        offset (query i at slot P + i): ``ExportGPT2``'s mask (plain), MultiHeadAttention's ``unidirectional``
        and GroupQueryAttention's own masking (``--optimize`` and the int8/int4 artifacts made from it).
        GroupQueryAttention takes several new tokens after a past for one row only: a batch of rows is fed
        one token at a time there (the engine extends single rows)."""
        return self._extend(state, input_ids, attention_mask, position_ids, every=False)

    def extend_all(
        self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, OrtState]:
        """``extend`` with the logits of every new position (B, T, V): speculative decoding's verify pass (the graph
        computes them anyway)."""
        return self._extend(state, input_ids, attention_mask, position_ids, every=True)

    def _extend(
        self, state: OrtState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, every: bool
    ) -> tuple[np.ndarray, OrtState]:
        seq = input_ids.shape[1]
        if not (self.gqa and state.batch > 1 and state.past > 0 and seq > 1):
            return self._step(state, input_ids, attention_mask, position_ids, every=every)
        parts, past = [], attention_mask.shape[1] - seq
        for t in range(seq):
            mask = attention_mask[:, : past + t + 1]
            logits, state = self._step(state, input_ids[:, t : t + 1], mask, position_ids[:, t : t + 1], every=every)
            parts.append(logits)
        return (np.concatenate(parts, axis=1) if every else parts[-1]), state

    def crop(self, state: OrtState, length: int) -> OrtState:
        """The first ``length`` positions: free in the shared buffer (the next step overwrites the slots after
        them); elsewhere one copy of what is kept (into the other buffer of the pair, or new host arrays)."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        if not 0 < length <= state.past:
            raise ValueError(f"crop: length {length} is outside a cache of {state.past} positions")
        if length == state.past:
            return state
        if self.kv_shared:
            state.past = length
            return state
        if self.io_binding and self._device_buffers:
            return self._select_on_device(state, np.arange(state.batch), 0, length)
        views = self._kv_views(state)
        return self._write(state, state.batch, length, lambda i, target: _copy(target, views[i][:, :, :length]))

    def copy_rows(
        self, state: OrtState, rows: np.ndarray, *, start: int = 0, stop: int | None = None, room: int = 0
    ) -> OrtState:
        """New buffers holding ``rows``, positions ``start:stop``: one copy, where the cache lives."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        stop = state.past if stop is None else stop
        if rows.size == 0 or rows.min() < 0 or rows.max() >= state.batch or not 0 <= start < stop <= state.past:
            raise ValueError(f"copy_rows: rows {rows.tolist()} / {start}:{stop} outside {state.batch} x {state.past}")
        new, length = self._new_state(len(rows)), stop - start
        if self.io_binding and self._device_buffers:
            self._copy_on_device(state, rows, start, stop, new, 0)
            new.past = length
            return new
        sources = [view[:, :, start:stop] for view in self._kv_views(state)]
        if self.kv_shared:  # room to grow by, so that the next extend does not move the copy again
            new.capacity = min(length + max(room, 0), max(length, self.spec.n_positions))
        return self._write(new, len(rows), length, lambda i, target: _take_rows(target, sources[i], rows))

    def nbytes(self, state: OrtState) -> int:
        """Bytes of the state's KV buffers as allocated (both of a ping-pong pair; a shared buffer's capacity)."""
        if not self.io_binding:
            return sum({id(a): a.nbytes for a in state.arrays}.values())
        if self.kv_shared:
            return sum(pair[0].nbytes for pair in state.buffers if pair[0] is not None)
        return sum(sum(pair) for pair in state.sizes) * np.dtype(self.np_dtype).itemsize

    def select(self, state: OrtState, rows: np.ndarray, *, start: int = 0) -> OrtState:
        """Keep ``rows`` (in that order), positions ``start:``. With shared buffers, where no kept row's source is
        overwritten before it is read, the rows move inside the buffers they are in: a row that stays put with no
        padding cut is not copied at all (rows leaving a batch move only the rows that fill their slots)."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        rows = np.asarray(rows, dtype=np.int64)
        if self.io_binding and self._device_buffers:
            return self._select_on_device(state, rows, start, state.past)
        sources = [view[:, :, start:] for view in self._kv_views(state)]
        in_place = self.kv_shared and _movable_in_place(rows)
        return self._write(
            state,
            len(rows),
            state.past - start,
            lambda i, target: _take_rows(target, sources[i], rows),
            in_place=in_place,
        )

    def merge(self, state: OrtState, other: OrtState) -> OrtState:
        """Rows of ``state`` then ``other``, the shorter cache left-padded with zeros: one copy per join
        (where the cache lives), after which decode runs on the merged buffers as usual."""
        self.session  # noqa: B018 - raises BackendClosedError once closed
        width = max(state.past, other.past)
        if self.io_binding and self._device_buffers:
            return self._merge_on_device(state, other, width)
        mine, theirs, split = self._kv_views(state), self._kv_views(other), state.batch

        def fill(i: int, target: np.ndarray) -> None:
            for part, rows in ((mine[i], slice(None, split)), (theirs[i], slice(split, None))):
                pad = width - part.shape[2]
                _copy_kv(target[rows, :, pad:], part)  # first: in place, the source is the slots being padded
                target[rows, :, :pad] = 0  # masked slots, but never garbage (0 x NaN is NaN)

        room = max(state.capacity, other.capacity)  # where new buffers are needed: no growth right after
        return self._write(state, state.batch + other.batch, width, fill, in_place=True, capacity=room)

    def logits_all(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits of every position (B, T, V) float32 from a prefill with an empty past, no state kept
        (scoring, ``cpm_infer.eval``); the graph outputs them anyway."""
        ids, mask, pos = (np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids))
        empty = np.zeros(kv.kv_shape(self.spec, ids.shape[0], 0), dtype=self.np_dtype)
        feeds = {
            kv.INPUT_IDS: ids,
            kv.ATTENTION_MASK: mask,
            kv.POSITION_IDS: pos,
            **dict.fromkeys(self.past_names, empty),
        }
        if self.keep:
            feeds[kv.LOGITS_TO_KEEP] = _KEEP_ALL
        return self._run(lambda: self.session.run([kv.LOGITS], feeds))[0]

    # -- internals ------------------------------------------------------------------------
    def _new_state(self, batch: int) -> OrtState:
        """An empty cache of ``batch`` rows in this backend's mode."""
        state = OrtState(batch=batch, past=0)
        if self.io_binding:
            state.binding = self.session.io_binding()
            state.buffers = [[None, None] for _ in self.past_names]
            state.sizes = [[0, 0] for _ in self.past_names]
        else:
            empty = np.zeros(kv.kv_shape(self.spec, batch, 0), dtype=self.np_dtype)
            state.arrays = [empty] * len(self.past_names)
        return state

    def _step(
        self, state: OrtState, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, *, every: bool = False
    ) -> tuple[np.ndarray, OrtState]:
        """One run of the graph; the last position's logits (B, V), or every position's (B, T, V) with ``every``."""
        ids, mask, pos = (np.ascontiguousarray(a, dtype=np.int64) for a in (ids, mask, pos))
        _batch, seq = ids.shape
        if self.io_binding:
            logits = self._run_bound(state, ids, mask, pos, every)
        else:
            feeds = {kv.INPUT_IDS: ids, kv.ATTENTION_MASK: mask, kv.POSITION_IDS: pos}
            feeds.update(zip(self.past_names, state.arrays, strict=True))
            if self.keep:
                feeds[kv.LOGITS_TO_KEEP] = _KEEP_ALL if every else _KEEP_LAST
            outputs = self._run(lambda: self.session.run(None, feeds))
            logits = outputs[0]
            state.arrays = outputs[1:]
        if not every:
            logits = logits[:, -1, :]
        state.past += seq
        return np.array(logits, dtype=np.float32), state

    def _run_bound(
        self, state: OrtState, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, every: bool
    ) -> np.ndarray:
        io, batch, seq = state.binding, ids.shape[0], ids.shape[1]
        total = state.past + seq
        for name, array in ((kv.INPUT_IDS, ids), (kv.ATTENTION_MASK, mask), (kv.POSITION_IDS, pos)):
            io.bind_cpu_input(name, array)
        rows = seq  # logits positions the graph returns
        if self.keep:
            io.bind_cpu_input(kv.LOGITS_TO_KEEP, _KEEP_ALL if every else _KEEP_LAST)
            rows = seq if every else 1
        if self.kv_shared:
            return self._run_shared(state, batch, rows, total)
        past_shape = kv.kv_shape(self.spec, batch, state.past)
        present_shape = kv.kv_shape(self.spec, batch, total)
        need = int(np.prod(present_shape))
        read, write = state.current, 1 - state.current
        for i, (past_name, present_name) in enumerate(zip(self.past_names, self.present_names, strict=True)):
            source = self._ensure(state, i, read, max(1, int(np.prod(past_shape))))
            target = self._ensure(state, i, write, need)
            io.bind_input(past_name, *self._where(), self.np_dtype, past_shape, self._ptr(source))
            io.bind_output(present_name, *self._where(), self.np_dtype, present_shape, self._ptr(target))
        vocab = self.spec.vocab_size
        if state.logits is None or state.logits.size < batch * rows * vocab:
            state.logits = np.empty(batch * rows * vocab, dtype=np.float32)
        io.bind_output(kv.LOGITS, "cpu", 0, np.float32, (batch, rows, vocab), state.logits.ctypes.data)
        self._run(lambda: self.session.run_with_iobinding(io))
        state.current = write
        return state.logits[: batch * rows * vocab].reshape(batch, rows, vocab)

    def _run_shared(self, state: OrtState, batch: int, rows: int, total: int) -> np.ndarray:
        """Past and present bound to the same (B, nh, capacity, hs) buffer: the graph appends in place.
        ``rows``: the logits positions the graph returns."""
        io = state.binding
        if total > state.capacity:  # grow x2 (capped at the context), keeping the filled prefix: O(log n) times
            capacity = min(max(total, 2 * state.capacity, 64), max(total, self.spec.n_positions))
            slots = max(batch, state.buffers[0][0].shape[0]) if state.buffers[0][0] is not None else batch
            shape = kv.kv_shape(self.spec, slots, capacity)
            grown = [np.empty(shape, dtype=self.np_dtype) for _ in self.past_names]
            for new, pair in zip(grown, state.buffers, strict=True):
                if pair[0] is not None:
                    new[:batch, :, : state.past] = pair[0][:batch, :, : state.past]
            state.buffers, state.capacity = [[buffer, None] for buffer in grown], capacity
            state.bound = None
        vocab = self.spec.vocab_size
        if state.logits is None or state.logits.size < batch * rows * vocab:
            state.logits = np.empty(batch * rows * vocab, dtype=np.float32)
            state.bound = None
        # The KV buffers and the logits buffer stay put between steps: bind them only when they move or
        # change shape (each bind costs microseconds of host time, and there are 2 per layer).
        where = (batch, rows, state.capacity, state.logits.ctypes.data)
        if state.bound != where:
            shape = kv.kv_shape(self.spec, batch, state.capacity)
            for (buffer, _), past_name, present_name in zip(
                state.buffers, self.past_names, self.present_names, strict=True
            ):
                io.bind_input(past_name, "cpu", 0, self.np_dtype, shape, buffer.ctypes.data)
                io.bind_output(present_name, "cpu", 0, self.np_dtype, shape, buffer.ctypes.data)
            io.bind_output(kv.LOGITS, "cpu", 0, np.float32, (batch, rows, vocab), state.logits.ctypes.data)
            state.bound = where
        self._run(lambda: self.session.run_with_iobinding(io))
        return state.logits[: batch * rows * vocab].reshape(batch, rows, vocab)

    def _ensure(self, state: OrtState, index: int, which: int, elements: int, batch: int | None = None) -> Any:
        """Buffer ``which`` of KV tensor ``index`` with room for ``elements`` (grows x2, capped)."""
        if state.sizes[index][which] >= elements:
            return state.buffers[index][which]
        row = self.spec.n_head * self.spec.n_positions * self.spec.head_dim
        rows = max(1, state.batch if batch is None else batch)
        size = max(elements, min(2 * state.sizes[index][which], rows * row))
        if self._device_buffers:
            buffer: Any = self._ort.OrtValue.ortvalue_from_shape_and_type([size], self.np_dtype, *self._where())
        else:
            buffer = np.empty(size, dtype=self.np_dtype)
        state.buffers[index][which], state.sizes[index][which] = buffer, size
        return buffer

    def _kv_views(self, state: OrtState) -> list[np.ndarray]:
        """Each KV tensor of a host-resident state as an array (B, nh, past, hs)."""
        if not self.io_binding:
            return list(state.arrays)
        if self.kv_shared:
            return [pair[0][: state.batch, :, : state.past] for pair in state.buffers]
        shape = kv.kv_shape(self.spec, state.batch, state.past)
        return [pair[state.current][: int(np.prod(shape))].reshape(shape) for pair in state.buffers]

    def _write(
        self,
        state: OrtState,
        batch: int,
        past: int,
        fill: Callable[[int, np.ndarray], None],
        *,
        in_place: bool = False,
        capacity: int = 0,
    ) -> OrtState:
        """Give a host-resident state a new (batch, nh, past, hs) cache: ``fill(i, target)`` writes KV tensor ``i``
        into its target (new arrays, the other buffer of each pair, or the first slots of the shared buffers), so
        what is kept is copied once, with no temporaries; the sources may be the state's current buffers.
        ``in_place``: ``fill`` is safe with its sources in its target (rows move only into slots no later row is
        read from; numpy copies overlapping slices through a temporary), so shared buffers with room are kept:
        a join or a leave moves rows, not the whole cache into new memory. ``capacity``: the sequence slots of new
        shared buffers (at least ``past`` and the state's own)."""
        shape = kv.kv_shape(self.spec, batch, past)
        if not self.io_binding:
            state.arrays = [np.empty(shape, dtype=self.np_dtype) for _ in self.past_names]
            for i, target in enumerate(state.arrays):
                fill(i, target)
        elif self.kv_shared:
            held = state.buffers[0][0] if state.buffers else None
            if not (in_place and held is not None and held.shape[0] >= batch and state.capacity >= past):
                reserved = in_place and self._lend_reserve(state, batch)
                if not reserved:
                    capacity = max(state.capacity, past, capacity)
                    shape = kv.kv_shape(self.spec, _row_slots(batch) if in_place else batch, capacity)
                    state.buffers = [[np.empty(shape, dtype=self.np_dtype), None] for _ in self.past_names]
                    state.capacity = capacity
                state.bound = None  # new buffers: bind them at the next step
            for i, (buffer, _) in enumerate(state.buffers):
                fill(i, buffer[:batch, :, :past])
        else:
            other, size = 1 - state.current, int(np.prod(shape))
            for i in range(len(self.past_names)):
                fill(i, self._ensure(state, i, other, max(1, size), batch)[:size].reshape(shape))
            state.current = other
        state.batch, state.past = batch, past
        return state

    def _select_on_device(self, state: OrtState, rows: np.ndarray, start: int, stop: int) -> OrtState:
        """Rows gathered (and leading padding or trailing positions cut) where the cache lives: no host round
        trip; the result goes to the other buffer of each pair."""
        other = 1 - state.current
        self._copy_on_device(state, rows, start, stop, state, other)
        state.current, state.batch, state.past = other, len(rows), stop - start
        return state

    def _copy_on_device(
        self, state: OrtState, rows: np.ndarray, start: int, stop: int, into: OrtState, which: int
    ) -> None:
        """Rows ``rows``, positions ``start:stop`` of ``state``'s current buffers into buffer ``which`` of
        ``into``'s pairs (grown to fit)."""
        need = len(rows) * self.spec.n_head * (stop - start) * self.spec.head_dim
        targets = [self._ptr(self._ensure(into, i, which, need, len(rows))) for i in range(len(state.buffers))]
        sources = [self._ptr(pair[state.current]) for pair in state.buffers]
        if start == 0 and stop == state.past:
            row = self.spec.n_head * state.past * self.spec.head_dim
            self._row_gather()(sources, targets, batch=state.batch, row=row, rows=rows)
        else:
            self._kv_ops().select(
                sources, targets, batch=state.batch, length=state.past, rows=rows, start=start, stop=stop
            )

    def _merge_on_device(self, state: OrtState, other: OrtState, width: int) -> OrtState:
        batch = state.batch + other.batch
        free = 1 - state.current
        need = batch * self.spec.n_head * width * self.spec.head_dim
        targets = [self._ensure(state, i, free, need, batch) for i in range(len(state.buffers))]
        self._kv_ops().merge(
            [self._ptr(pair[state.current]) for pair in state.buffers],
            [self._ptr(pair[other.current]) for pair in other.buffers],
            [self._ptr(t) for t in targets],
            shapes=((state.batch, state.past), (other.batch, other.past)),
        )
        state.current, state.batch, state.past = free, batch, width
        return state

    def _where(self) -> tuple[str, int]:
        return ("cpu", 0) if self.device_kind == "cpu" else ("cuda", self.device_id)

    def _row_gather(self) -> RowGather:
        if self._gather is None:  # built on the first select, on the session's own providers
            providers: list[Any] = ["CPUExecutionProvider"]
            if self.device_kind == "cuda":
                providers.insert(0, ("CUDAExecutionProvider", cuda_provider_options(self.device_id)))
            self._gather = RowGather(
                self._ort, len(self.past_names), self.np_dtype, device=self._where(), providers=providers
            )
        return self._gather

    def _kv_ops(self) -> KvOps:
        if self._ops is None:  # built on the first device-side join or cut, on the session's providers
            providers: list[Any] = ["CPUExecutionProvider"]
            if self.device_kind == "cuda":
                providers.insert(0, ("CUDAExecutionProvider", cuda_provider_options(self.device_id)))
            self._ops = KvOps(
                self._ort,
                len(self.past_names),
                self.np_dtype,
                heads=self.spec.n_head,
                dim=self.spec.head_dim,
                device=self._where(),
                providers=providers,
            )
        return self._ops

    @staticmethod
    def _ptr(buffer: Any) -> int:
        return buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()

    def _run(self, call: Any) -> Any:
        try:
            return call()
        except BackendClosedError:
            raise
        except Exception as exc:  # ORT raises its own exception types; report one line
            raise OrtLoadError(f"onnxruntime failed to run the graph: {first_line(exc)}") from exc


def _take_rows(target: np.ndarray, source: np.ndarray, rows: np.ndarray) -> None:
    """``target[j] = source[rows[j]]`` row by row: one copy, no temporary."""
    for j, row in enumerate(rows):
        _copy_kv(target[j : j + 1], source[row : row + 1])


def _copy_kv(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` for (rows, nh, L, hs) views. The same view (a row that stays in its slot, in place) is
    left as it is; views of one buffer (a row shifted in place) are copied with one ``memmove`` per row and head,
    whose (L, hs) blocks are contiguous and overlap only each other: numpy would copy the whole overlapping view
    through a temporary."""
    if (target.ctypes.data, target.shape, target.strides) == (source.ctypes.data, source.shape, source.strides):
        return
    contiguous = all(a.strides[3] == a.itemsize and a.strides[2] == a.shape[3] * a.itemsize for a in (target, source))
    if not contiguous or not np.may_share_memory(target, source):
        target[...] = source
        return
    block = source.shape[2] * source.shape[3] * source.itemsize
    to, fro = target.ctypes.data, source.ctypes.data
    for r in range(target.shape[0]):
        for h in range(target.shape[1]):
            ctypes.memmove(
                to + r * target.strides[0] + h * target.strides[1],
                fro + r * source.strides[0] + h * source.strides[1],
                block,
            )


def _movable_in_place(rows: np.ndarray) -> bool:
    """Whether ``target[j] = source[rows[j]]``, j = 0, 1, ..., within one buffer reads every source before it is
    overwritten: no slot j written (``rows[j] != j``) is read by a later row."""
    order = [int(r) for r in rows]
    return all(row == j or j not in order[j + 1 :] for j, row in enumerate(order))


def _row_slots(batch: int) -> int:
    return -(-batch // ROW_SLOTS) * ROW_SLOTS


def _copy(target: np.ndarray, source: np.ndarray) -> None:
    target[...] = source


def load(
    path: Path,
    *,
    device: str | Device = "cpu",
    tokenizer_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    io_binding: bool = True,
):
    """Open an ONNX artifact directory as an OrtBackend (and its tokenizer)."""
    path = Path(path)
    require("onnxruntime", "ort-gpu" if str(device).startswith("cuda") else "ort")
    device = resolve_device(device, "ort")
    manifest = read_manifest(path, expected_format="onnx")
    tokenizer = CpmTokenizer(tokenizer_file or path / manifest.tokenizer_file)
    check_tokenizer_fits(tokenizer.vocab_size, manifest.spec, path, tokenizer.path)
    reopen = functools.partial(create_session, path / manifest.graph_files["model"], device=device, threads=threads)
    session = reopen()
    check_graph(session, manifest, path)
    log.info("onnxruntime %s on %s (%s)", manifest.graph_files["model"], session.get_providers()[0], manifest.dtype)
    shared = manifest.details.get("kv_cache") == "shared"
    backend = OrtBackend(
        session, manifest.spec, dtype=manifest.dtype, device=device, io_binding=io_binding, kv_shared=shared
    )
    backend.reopen, backend.threads = reopen, threads
    return backend, tokenizer
