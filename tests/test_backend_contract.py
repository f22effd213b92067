"""The backend contract made explicit: typed loaders, close() everywhere, Scorer for one-pass scoring."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

from cpm_infer.backends import LOADERS, get_loader, load_backend
from cpm_infer.backends.base import Backend, BackendClosedError, Scorer
from cpm_infer.engine.generate import left_pad


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_loader_has_the_loader_signature(name):
    params = inspect.signature(get_loader(name)).parameters
    first = next(iter(params.values()))
    assert first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)  # the path
    for keyword in ("device", "tokenizer_file", "threads"):
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
        assert params[keyword].default is not inspect.Parameter.empty


def test_backend_classes_declare_close_and_scoring():
    from cpm_infer.backends.ort_backend import OrtBackend
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.backends.trt.backend import TrtBackend

    for cls in (TorchBackend, OrtBackend, TrtBackend):
        assert callable(getattr(cls, "close", None)), cls
    assert issubclass(TorchBackend, Scorer) and issubclass(OrtBackend, Scorer)
    assert not issubclass(TrtBackend, Scorer)  # scored by teacher forcing through prefill/decode


def test_torch_backend_close_is_idempotent_and_final(tiny_checkpoint):
    backend, _ = load_backend("torch", tiny_checkpoint)
    assert isinstance(backend, Backend) and isinstance(backend, Scorer)
    ids, mask, pos = left_pad([[5, 6, 7]], pad_id=0)
    logits, _ = backend.prefill(ids, mask, pos)
    assert logits.shape == (1, backend.spec.vocab_size)
    backend.close()
    backend.close()
    with pytest.raises(BackendClosedError, match="torch backend is closed"):
        backend.prefill(ids, mask, pos)


def test_eval_refuses_what_cannot_score():
    from cpm_infer.eval import EvalError, token_logprobs
    from cpm_infer.eval.logprobs import all_logits

    class Nothing:
        name = "nothing"

        class spec:  # a stand-in for ModelSpec
            n_positions = 16

    ids = np.array([[1, 2, 3]])
    with pytest.raises(EvalError, match="nothing cannot score text: it has neither logits_all"):
        token_logprobs(Nothing(), ids)
    with pytest.raises(EvalError, match="cannot score"):
        all_logits(object(), ids, np.ones_like(ids), np.arange(3)[None])


def test_server_shutdown_closes_a_backend_it_owns(tiny_checkpoint):
    from cpm_infer.serve.app import create_app
    from cpm_infer.serve.server import BackgroundServer
    from cpm_infer.serve.settings import ServeSettings

    owned, tok = load_backend("torch", tiny_checkpoint)
    shared, _ = load_backend("torch", tiny_checkpoint)
    with BackgroundServer(create_app(owned, tok, ServeSettings(), warmup=False, owns_backend=True)):
        pass
    with BackgroundServer(create_app(shared, tok, ServeSettings(), warmup=False)):
        pass
    ids, mask, pos = left_pad([[5, 6]], pad_id=0)
    with pytest.raises(BackendClosedError):
        owned.prefill(ids, mask, pos)
    assert shared.prefill(ids, mask, pos)[0].shape[0] == 1  # not owned: left open for its owner


# -- KvCacheOps: extend, crop, copy_rows (prefix cache, chunked prefill) ------------------------------
KV_KINDS = [
    ("torch", None, False),
    ("plain", False, False),  # host arrays
    ("plain", True, False),  # IO binding, ping-pong host buffers
    ("plain", True, True),  # device-resident buffers (the CUDA path's small ORT graphs, bound on the CPU here)
    ("fused", False, False),  # --optimize: GroupQueryAttention with separate past/present
    ("fused", True, False),  # ... with past and present one buffer, written in place
    ("int8", True, False),
    ("int4", True, False),
]


@pytest.fixture(scope="module")
def kv_artifacts(tiny_checkpoint, tmp_path_factory):
    """Each ONNX artifact kind: plain, --optimize (fused attention, shared KV) and int8/int4 made from it."""
    pytest.importorskip("onnxruntime")
    from conftest import CORPUS

    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    root = tmp_path_factory.mktemp("kv-ops")
    gate = root / "gate.txt"
    gate.write_text((CORPUS + "\n") * 3, encoding="utf-8")
    out = {"plain": export_onnx(tiny_checkpoint, root / "plain").path}
    out["fused"] = export_onnx(tiny_checkpoint, root / "fused", optimize=True).path
    for scheme in ("int8", "int4"):
        options = QuantizeOptions(scheme, gate, force_quality=True)
        out[scheme] = export_onnx(out["fused"], root / scheme, quantize=options).path
    return out


def _kv_backend(kind, io_binding, on_device, tiny_checkpoint, kv_artifacts):
    if kind == "torch":
        return load_backend("torch", tiny_checkpoint)[0]
    from cpm_infer.backends.ort_backend import load

    backend, _ = load(kv_artifacts[kind], io_binding=io_binding)
    backend._device_buffers = on_device
    assert backend.kv_shared == (kind != "plain" and io_binding)
    return backend


def _sequence(vocab, padded: bool):
    """Two rows of 70 tokens (the second with 9 slots of left padding), or one row."""
    ids = np.random.default_rng(0).integers(10, vocab - 1, size=(2 if padded else 1, 70))
    mask = np.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    return ids, mask, np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)


def _prefill_in_pieces(backend, ids, mask, pos, cuts):
    edges = [0, *cuts, ids.shape[1]]
    logits, state = backend.prefill(ids[:, : edges[1]], mask[:, : edges[1]], pos[:, : edges[1]])
    for a, b in itertools.pairwise(edges[1:]):
        logits, state = backend.extend(state, ids[:, a:b], mask[:, :b], pos[:, a:b])
    return logits, state


@pytest.mark.parametrize(("kind", "io_binding", "on_device"), KV_KINDS)
def test_extend_by_chunks_equals_one_prefill(kind, io_binding, on_device, tiny_checkpoint, kv_artifacts):
    """Causal within the new tokens for every artifact kind: prefill(a) + extend(b) + extend(c) == prefill(a+b+c),
    the logits after it and after one more decode step (the cache, not just the last position). Quantized
    graphs are checked on one row: their kernels round differently for another count of rows per call."""
    from cpm_infer.backends.base import supports_kv_ops

    backend = _kv_backend(kind, io_binding, on_device, tiny_checkpoint, kv_artifacts)
    assert supports_kv_ops(backend)
    ids, mask, pos = _sequence(backend.spec.vocab_size, padded=kind not in ("int8", "int4"))
    want, whole = backend.prefill(ids, mask, pos)
    nxt = np.full((len(ids), 1), 11)
    more_mask, more_pos = np.concatenate([mask, np.ones_like(nxt)], 1), pos[:, -1:] + 1
    want_next, _ = backend.decode(whole, nxt, more_mask, more_pos)
    for cuts in ([20, 50], [1, 2, 69], [64]):  # [64]: past the shared buffer's first capacity
        got, state = _prefill_in_pieces(backend, ids, mask, pos, cuts)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=str(cuts))
        got_next, _ = backend.decode(state, nxt, more_mask, more_pos)
        np.testing.assert_allclose(got_next, want_next, atol=1e-4, rtol=1e-4, err_msg=str(cuts))


@pytest.mark.parametrize(("kind", "io_binding", "on_device"), KV_KINDS)
def test_crop_and_copy_rows(kind, io_binding, on_device, tiny_checkpoint, kv_artifacts):
    """crop rolls back; copy_rows is a state of its own: what either state does later never touches the other
    (the original goes on through select, merge and decode while the copy extends, and the reverse)."""
    backend = _kv_backend(kind, io_binding, on_device, tiny_checkpoint, kv_artifacts)
    ids, mask, pos = _sequence(backend.spec.vocab_size, padded=True)
    want, _ = backend.prefill(ids, mask, pos)
    tol = {"atol": 1e-4, "rtol": 1e-4} if kind not in ("int8", "int4") else {"atol": 0.1, "rtol": 0.0}
    _, state = backend.prefill(ids[:, :60], mask[:, :60], pos[:, :60])
    copy = backend.copy_rows(state, np.array([1]), start=9, stop=40, room=30)  # row 1 without its padding
    assert 0 < backend.nbytes(copy) < backend.nbytes(state)
    # the original: rolled back to 30 positions, rows swapped and joined by a copy of itself, decoded
    state = backend.crop(state, 30)
    got, state = backend.extend(state, ids[:, 30:70], mask, pos[:, 30:70])
    np.testing.assert_allclose(got, want, **tol)
    state = backend.select(state, np.array([1, 0]))
    state = backend.merge(state, backend.copy_rows(state, np.array([0])))
    step = np.concatenate([mask[[1, 0, 1]], np.ones((3, 1), np.int64)], 1)
    backend.decode(state, np.array([[3], [4], [5]]), step, pos[[1, 0, 1], -1:] + 1)
    # the copy still holds row 1's first 31 real tokens: extending it by the rest gives row 1's logits
    real = ids[1, 9:]
    got, copy = backend.extend(copy, real[None, 31:], np.ones((1, 61), np.int64), np.arange(31, 61)[None])
    np.testing.assert_allclose(got[0], want[1], **tol)
    # and the reverse: a copy that decodes leaves its source alone
    source = backend.copy_rows(copy, np.array([0]))
    backend.decode(copy, np.array([[7]]), np.ones((1, 62), np.int64), np.array([[61]]))
    backend.crop(copy, 5)
    again, _ = backend.extend(backend.crop(source, 60), real[None, 60:], np.ones((1, 61), np.int64), np.array([[60]]))
    np.testing.assert_allclose(again[0], want[1], **tol)


def test_tensorrt_declares_no_kv_ops():
    """TensorRT engines prefill from an empty past and decode one token: the engine falls back to whole prefills."""
    from cpm_infer.backends.base import KvCacheOps, supports_kv_ops
    from cpm_infer.backends.ort_backend import OrtBackend
    from cpm_infer.backends.torch_backend import TorchBackend
    from cpm_infer.backends.trt.backend import TrtBackend

    assert issubclass(TorchBackend, KvCacheOps) and issubclass(OrtBackend, KvCacheOps)
    assert not issubclass(TrtBackend, KvCacheOps)
    assert not supports_kv_ops(object.__new__(TrtBackend))
