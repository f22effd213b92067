"""Weights of an ONNX graph without holding them in memory: external data written, read and packed
one tensor at a time.

An export works on graphs whose matrices live in an external data file (``model.onnx.data``), each
at an offset aligned to 64 KiB so that ONNX Runtime can memory-map it (pages are read on demand
and belong to the page cache, not to the process's heap). The graph protobuf itself is then a few
hundred KB and every rewrite (fusions, quantization) loads it without its weights; only vectors
(biases, LayerNorm parameters: O(hidden) each) stay inline, since ORT's fusion code reads them.

``pack_inline`` turns such a graph into one self-contained file (the layout of artifacts under the
2 GB protobuf limit) by writing the protobuf's wire format directly: the graph without its
initializers, then each initializer with its bytes copied from the data file, so the whole model
is never materialised as one Python object or one serialized string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 64 * 1024  # external tensors start at multiples of this: page- and Windows-allocation-aligned
INLINE_NDIM = 1  # tensors of this rank or less (biases, norms, scalars) stay inline in the protobuf


def load_graph(path: Path) -> Any:
    """The ModelProto of ``path`` with external tensors left as references (no weight bytes read)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def save_graph(model: Any, path: Path) -> None:
    """Write the protobuf only; external tensors keep pointing at their data file."""
    path.write_bytes(model.SerializeToString())


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


def external_info(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def nbytes(tensor: Any) -> int:
    """Bytes of a tensor's data (external length, raw data, or typed fields), without reading it."""
    if is_external(tensor):
        return int(external_info(tensor).get("length", 0))
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    from onnx import helper

    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_bytes(model: Any) -> int:
    return sum(nbytes(t) for t in model.graph.initializer)


def tensor_array(tensor: Any, base_dir: Path) -> np.ndarray:
    """The tensor's value; a read-only memory map of the data file for external tensors (no copy)."""
    from onnx import helper, numpy_helper

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    offset = int(info.get("offset", 0))
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(base_dir / info["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


class ExternalDataWriter:
    """Appends tensors to one external data file; returns the TensorProto that references each."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        self.path = path
        self.location = path.name
        self._file = open(path, "ab" if append else "wb")
        self._file.seek(0, os.SEEK_END)

    def add(self, name: str, array: np.ndarray, *, inline_ndim: int = INLINE_NDIM) -> Any:
        """``array`` as a TensorProto named ``name``: inline when its rank is <= ``inline_ndim``,
        else its bytes are written here (streamed from ``array``, which may be a memory map)."""
        from onnx import TensorProto, helper, numpy_helper

        array = np.asarray(array)
        if array.ndim <= inline_ndim:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        return self._store(tensor, np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def add_proto(self, tensor: Any, base_dir: Path | None = None, *, inline_ndim: int = INLINE_NDIM) -> Any:
        """``tensor`` (a TensorProto, inline or external to a file in ``base_dir``) with its bytes moved
        or copied here, byte for byte (packed types such as int4 keep their encoding); tensors of rank
        <= ``inline_ndim`` stay (or become) inline."""
        from onnx import TensorProto

        out = TensorProto()
        out.CopyFrom(tensor)
        if is_external(tensor):
            if base_dir is None:
                raise ValueError(f"{tensor.name} is external: pass the directory of its data file")
            info = external_info(tensor)
            start = int(info.get("offset", 0))
            data = np.memmap(base_dir / info["location"], dtype=np.uint8, mode="r")[start : start + nbytes(tensor)]
            del out.external_data[:]
            out.ClearField("data_location")
            if len(tensor.dims) <= inline_ndim:
                out.raw_data = data.tobytes()
                return out
        elif len(tensor.dims) <= inline_ndim or not tensor.HasField("raw_data"):
            return out
        else:
            data = np.frombuffer(tensor.raw_data, dtype=np.uint8)
        out.ClearField("raw_data")
        return self._store(out, data)

    def _store(self, tensor: Any, data: np.ndarray) -> Any:
        """Append ``data`` (flat uint8) at the next aligned offset and point ``tensor`` at it."""
        from onnx import TensorProto

        end = self._file.tell()
        offset = -(-end // ALIGN) * ALIGN
        self._file.write(bytes(offset - end))  # zero padding (append mode cannot seek)
        chunk = 64 * 2**20  # a bounded copy at a time for memory maps; none for in-memory arrays
        for start in range(0, data.size, chunk):
            self._file.write(memoryview(data[start : start + chunk]))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", data.size)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def data_files(model: Any) -> set[str]:
    """The external data files a graph reads (relative to its directory)."""
    return {external_info(t)["location"] for t in model.graph.initializer if is_external(t)}


# -- one self-contained file, written field by field ----------------------------------------------
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # length-delimited


def pack_inline(source: Path, target: Path) -> None:
    """Write ``source`` (a graph with external data) as one self-contained protobuf ``target``.

    Protobuf parsers accept a message's fields in any order, so the file is: the model's fields
    without the graph, the graph's key and length, the graph without initializers, then one
    initializer record after another, each with its raw bytes copied from the data file.
    """
    model = load_graph(source)
    base = source.parent
    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    head = model.SerializeToString()

    records: list[tuple[bytes, int, int, Any]] = []  # (tensor without data, data size, record size, tensor)
    graph_length = len(graph)
    for tensor in tensors:
        meta, size = _inline_meta(tensor)
        body = len(meta) + (len(_key(_TENSOR_RAW_DATA)) + len(_varint(size)) + size if size else 0)
        graph_length += len(_key(_GRAPH_INITIALIZER)) + len(_varint(body)) + body
        records.append((meta, size, body, tensor))
    handles: dict[str, Any] = {}
    try:
        with open(target, "wb") as out:
            out.write(head)
            out.write(_key(_MODEL_GRAPH) + _varint(graph_length))
            out.write(graph)
            for meta, size, body, tensor in records:
                out.write(_key(_GRAPH_INITIALIZER) + _varint(body) + meta)
                if size:
                    out.write(_key(_TENSOR_RAW_DATA) + _varint(size))
                    info = external_info(tensor)
                    if info["location"] not in handles:
                        handles[info["location"]] = open(base / info["location"], "rb", buffering=0)
                    _copy_range(handles[info["location"]], int(info.get("offset", 0)), size, out)
    finally:
        for handle in handles.values():
            handle.close()


def _copy_range(source: Any, offset: int, size: int, out: Any, chunk: int = 64 * 2**20) -> None:
    """Copy ``size`` bytes of ``source`` from ``offset`` through one reused buffer. Plain reads, not a
    memory map: read pages stay in the page cache, outside the process's resident set, whereas a
    map's pages would count towards it (the whole data file by the end)."""
    buffer = bytearray(min(chunk, size))
    view = memoryview(buffer)
    source.seek(offset)
    left = size
    while left:
        n = source.readinto(view[: min(chunk, left)])
        if not n:
            raise OSError(f"{source.name} ends before offset {offset + size}")
        out.write(view[:n])
        left -= n


def _inline_meta(tensor: Any) -> tuple[bytes, int]:
    """The serialized tensor without its external reference (and without raw bytes when external),
    and the size of the raw bytes still to append."""
    from onnx import TensorProto

    if not is_external(tensor):
        return tensor.SerializeToString(), 0
    meta = TensorProto()
    meta.CopyFrom(tensor)
    del meta.external_data[:]
    meta.ClearField("data_location")
    return meta.SerializeToString(), nbytes(tensor)


def remove_files(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)


def finish_layout(directory: Path, graph_files: dict[str, str], threshold: int) -> dict[str, str]:
    """The artifact's final layout: graphs whose weights are under ``threshold`` bytes become one
    self-contained file each (their data files are removed once no graph reads them); larger ones
    keep their external data, named in the returned ``graph_files`` (``weights`` for the first data
    file, ``optimized_weights`` for a second one)."""
    graphs = [role for role in ("portable", "model") if role in graph_files]
    files = {role: name for role, name in graph_files.items() if role in graphs}
    used: list[str] = []
    for role in graphs:
        path = directory / files[role]
        model = load_graph(path)
        external = sorted(data_files(model))
        if not external:
            continue
        if weight_bytes(model) < threshold:
            packed = path.with_name(f".{path.name}.packed")
            pack_inline(path, packed)
            os.replace(packed, path)
        else:
            used += [name for name in external if name not in used]
    stale = {name for name in os.listdir(directory) if name.endswith(".data")} - set(used)
    remove_files(directory, stale)
    for index, name in enumerate(used):
        files["weights" if index == 0 else "optimized_weights"] = name
    return files


def release_memory() -> None:
    """Collect freed Python objects and hand free heap pages back to the OS (glibc keeps freed
    blocks under its mmap threshold, up to 32 MB each, in its arenas otherwise)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass
