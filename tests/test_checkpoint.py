"""Loading Hugging Face GPT-2 directories in their various layouts, and refusing broken ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cpm_infer.backends import BackendError, detect_backend, load_backend
from cpm_infer.checkpoint import CheckpointError, open_checkpoint
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import generate
from cpm_infer.torch_model import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _state(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _logits(model, ids=(3, 4, 5, 6)):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    return _logits(model)


def test_safetensors_checkpoint_loads_with_tied_head(tiny_checkpoint, reference):
    model, tok = load_model(tiny_checkpoint)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tok.path.name == "spiece.model"
    assert open_checkpoint(tiny_checkpoint).format == "safetensors"


def test_pytorch_bin_with_legacy_buffers_and_no_prefix(tmp_path, tiny_checkpoint, reference):
    ckpt = _copy(tiny_checkpoint, tmp_path / "bin")
    state = _state(ckpt)
    (ckpt / "model.safetensors").unlink()
    # an old GPT2Model-style file: no "transformer." prefix, causal-mask buffers included
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    n_pos = json.loads((ckpt / "config.json").read_text())["n_positions"]
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(legacy, ckpt / "pytorch_model.bin")
    model, _ = load_model(ckpt)
    np.testing.assert_allclose(_logits(model), reference, atol=1e-6)


def test_sharded_safetensors(tmp_path, tiny_checkpoint, reference):
    from safetensors.torch import save_file

    ckpt = _copy(tiny_checkpoint, tmp_path / "sharded")
    state = _state(ckpt)
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(ckpt / name))
        weight_map.update({k: name for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model(ckpt)
    np.testing.assert_allclose(_logits(model), reference, atol=1e-6)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        open_checkpoint(ckpt)


def test_real_cpm_config_eos_50256_still_stops_at_eod(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "cpmcfg")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(bos_token_id=50256, eos_token_id=50256)
    (ckpt / "config.json").write_text(json.dumps(config))
    backend, tok = load_backend("torch", ckpt)
    # make <eod> the certain next token: the final hidden state becomes all ones, and <eod>'s
    # (tied) embedding row points the same way, far beyond every other row
    with torch.no_grad():
        backend.model.transformer.ln_f.weight.zero_()
        backend.model.transformer.ln_f.bias.fill_(1.0)
        backend.model.transformer.wte.weight[tok.eod_id] = 10.0
    result = generate(backend, [tok.encode("话说")], GenerationConfig(temperature=0, max_new_tokens=20), tok)[0]
    assert result.finish_reason == "eos" and result.token_ids == []


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "cannot read"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5})),
            "holds a bert model",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "cannot read weights"),
        (lambda d: (d / "spiece.model").unlink(), "no tokenizer"),
    ],
)
def test_broken_checkpoints_are_refused_in_one_line(tmp_path, tiny_checkpoint, breakage, message):
    ckpt = _copy(tiny_checkpoint, tmp_path / "broken")
    breakage(ckpt)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(ckpt)
    assert "\n" not in str(info.value)


def test_weights_not_matching_config(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "mismatch")
    config = json.loads((ckpt / "config.json").read_text())
    config["n_embd"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(ckpt)
    config["n_embd"], config["n_layer"] = 32, 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(ckpt)


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, tiny_checkpoint, shared_vocab):
    ckpt = _copy(tiny_checkpoint, tmp_path / "bigtok")
    shutil.copyfile(shared_vocab, ckpt / "spiece.model")
    with pytest.raises(CheckpointError, match="wrong tokenizer"):
        load_model(ckpt)


def test_explicit_tokenizer_file(tmp_path, tiny_checkpoint, tiny_vocab):
    ckpt = _copy(tiny_checkpoint, tmp_path / "notok")
    (ckpt / "spiece.model").unlink()
    assert open_checkpoint(ckpt, tiny_vocab).tokenizer_file == tiny_vocab
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        open_checkpoint(ckpt, tmp_path / "absent.model")


def test_backend_detection(tmp_path, tiny_checkpoint):
    assert detect_backend(tiny_checkpoint) == "torch"
    with pytest.raises(BackendError, match="not found"):
        detect_backend(tmp_path / "absent")
    with pytest.raises(BackendError, match="neither a checkpoint"):
        detect_backend(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(BackendError, match="unknown artifact format"):
        detect_backend(tmp_path)
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend("tpu", tiny_checkpoint)
