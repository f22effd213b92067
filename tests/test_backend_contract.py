"""The backend contract made explicit: typed loaders, close() everywhere, Scorer for one-pass scoring."""

from __future__ import annotations

import inspect

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
