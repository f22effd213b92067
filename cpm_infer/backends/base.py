"""The backend contract: what the generation loop needs from a model runtime.

Arrays cross this boundary as numpy (int64 ids/positions/masks in, float32 logits out), so the loop
never imports a runtime. The KV cache stays inside the opaque ``state`` (on the device for GPU
backends). Inputs, for a batch of B rows:

- ``input_ids``       (B, T) int64: the new tokens (the whole left-padded prompt on prefill, one
  token per row on decode).
- ``attention_mask``  (B, P + T) int64: 1 for real tokens, 0 for left padding, over past + new.
- ``position_ids``    (B, T) int64: ``cumsum(mask) - 1`` with padded positions at 0.

Both calls return the logits of the last position only, shape (B, V) float32, and the new state.

Continuous batching (``cpm_infer.engine``) moves rows in and out of a running batch: ``select`` keeps
some rows (repeats allowed: beam search) and may cut leading cache positions that are padding in
every kept row; ``merge`` appends a newly prefilled batch to the running one, left-padding the
shorter cache once, so later steps cost what they cost for any batch of that size.
The ONNX / TensorRT graphs follow the same contract with per-layer
``past_key_values.{i}.key|value`` inputs and ``present.{i}.key|value`` outputs of shape
(B, n_head, seq, head_dim), see ``cpm_infer.kv``.

Prefix caching and chunked prefill need three more operations, the optional :class:`KvCacheOps` (torch and
onnxruntime have them; TensorRT's engines prefill from an empty past and decode one token, so they do not, and
the engine falls back to whole prefills there, see :func:`supports_kv_ops`):

- ``extend``: like ``decode`` with T >= 1 new tokens per row (a prompt's next chunk, or its tail after a
  cached prefix); causal within the new tokens, so extending chunk by chunk equals one prefill.
- ``crop``: keep the first ``length`` cache positions (a rollback: a cached prefix, speculative decoding).
- ``copy_rows``: an independent state holding copies of some rows (a snapshot for the prefix cache);
  whatever later happens to either state never touches the other.

Three more pieces make the contract explicit: ``close()`` on every backend (the server calls it at
shutdown), :class:`Scorer` for backends that return the logits of every position in one pass
(``cpm_infer.eval``), and :class:`Loader`, what each entry of ``cpm_infer.backends.LOADERS`` names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError

if TYPE_CHECKING:
    from cpm_infer.devices import Device
    from cpm_infer.tokenizer import CpmTokenizer

State = Any


class BackendClosedError(CpmError):
    """The backend was closed; its sessions, engines and buffers are gone."""


@runtime_checkable
class Backend(Protocol):
    name: str
    spec: ModelSpec

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """Run the prompt (past length 0); return last-position logits (B, V) and the KV state."""
        ...

    def decode(
        self, state: State, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """Append one token per row to the state; return its logits (B, V) and the new state."""
        ...

    def select(self, state: State, rows: np.ndarray, *, start: int = 0) -> State:
        """Keep ``rows`` of the batch, in that order (a row may appear more than once), and the cache
        positions from ``start`` on (the caller cuts only columns that are padding in every kept row)."""
        ...

    def merge(self, state: State, other: State) -> State:
        """The rows of ``state`` followed by the rows of ``other`` (both fresh from prefill/decode/
        select of this backend). The shorter cache is left-padded with zeros to the longer one's
        length; the caller pads the attention mask to match (padded slots are masked out)."""
        ...

    def close(self) -> None:
        """Release the runtime's memory (model, session, engine, GPU buffers) now rather than at garbage
        collection. Idempotent; any later call raises :class:`BackendClosedError`."""
        ...


@runtime_checkable
class KvCacheOps(Protocol):
    """What prefix caching and chunked prefill need besides :class:`Backend` (optional: see ``supports_kv_ops``).

    Like ``select`` and ``merge``, ``extend`` and ``crop`` may reuse or mutate ``state`` and return it; only
    ``copy_rows`` leaves its argument alone and gives a state that shares nothing with it."""

    def extend(
        self, state: State, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """Append T >= 1 tokens to every row: ``input_ids`` (B, T), ``attention_mask`` (B, P + T),
        ``position_ids`` (B, T). Each new token attends to the past and to the new tokens before it (causal),
        so prefill(a + b) and extend(prefill(a), b) give the same cache and last logits (within float
        tolerance). Returns the last position's logits (B, V) and the state."""
        ...

    def crop(self, state: State, length: int) -> State:
        """Keep the first ``length`` cache positions of every row (0 < length <= the cache's length)."""
        ...

    def copy_rows(
        self, state: State, rows: np.ndarray, *, start: int = 0, stop: int | None = None, room: int = 0
    ) -> State:
        """A new state holding copies of ``rows`` (in that order), cache positions ``start:stop``; ``state`` is
        unchanged. ``room``: positions the copy will soon grow by (a backend with preallocated buffers reserves
        them, so the next ``extend`` does not move the copy again)."""
        ...

    def nbytes(self, state: State) -> int:
        """Bytes the state holds (its buffers as allocated, not only the filled positions)."""
        ...


@runtime_checkable
class Verifier(Protocol):
    """What speculative decoding needs besides :class:`KvCacheOps`: the logits of every new position of an
    ``extend`` (the target scores a draft's k proposals in one pass)."""

    def extend_all(
        self, state: State, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, State]:
        """``extend``, returning the logits of each of the T new positions (B, T, V) float32."""
        ...


def supports_speculation(backend: object) -> bool:
    """Whether ``backend`` can verify (or draft) in speculative decoding: :class:`KvCacheOps` and :class:`Verifier`."""
    return supports_kv_ops(backend) and isinstance(backend, Verifier)


def supports_kv_ops(backend: object) -> bool:
    """Whether ``backend`` offers :class:`KvCacheOps` (a backend may also say no with ``kv_ops = False``)."""
    return isinstance(backend, KvCacheOps) and bool(getattr(backend, "kv_ops", True))


@runtime_checkable
class Scorer(Protocol):
    """A backend that scores text in one pass (torch, ort); others are scored by teacher forcing."""

    def logits_all(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits of every position (B, T, V) float32 for unpadded or left-padded rows, no state kept."""
        ...


class Loader(Protocol):
    """What a ``LOADERS`` entry names: open ``path`` on ``device`` (``auto``, ``cpu``, ``cuda[:N]``, see
    ``cpm_infer.devices``), with its tokenizer (``tokenizer_file`` overrides the directory's)."""

    def __call__(
        self,
        path: Path,
        *,
        device: str | Device = ...,
        tokenizer_file: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> tuple[Backend, CpmTokenizer]: ...
