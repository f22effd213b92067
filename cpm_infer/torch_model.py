"""Build, load and save transformers' GPT2LMHeadModel for CPM (needs the ``torch`` extra)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cpm_infer.atomic import staged_dir
from cpm_infer.checkpoint import Checkpoint, CheckpointError, check_tokenizer_fits, open_checkpoint
from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.errors import first_line
from cpm_infer.tokenizer import CpmTokenizer

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel

log = logging.getLogger(__name__)

# Buffers that old GPT-2 checkpoints carry but transformers recomputes (causal mask constants).
_LEGACY_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_TIED = "lm_head.weight"


def hf_config(spec: ModelSpec, eod_id: int = 7, pad_id: int = 5, base: dict | None = None):
    """A GPT2Config for ``spec``. bos/eos are set to ``<eod>``: real CPM configs say 50256, which lies
    outside the 30000-piece vocabulary (generation stops at ``<eod>`` whatever the config says)."""
    transformers = require("transformers", "torch")
    values = dict(base or {})
    for key in ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"):
        values.pop(key, None)
    # ModelSpec's fields are GPT2Config's names (n_layer, n_head, n_embd, vocab_size, n_positions).
    values.update(spec.to_dict(), bos_token_id=eod_id, eos_token_id=eod_id, pad_token_id=pad_id)
    values.pop("n_ctx", None)
    values.pop("model_type", None)
    return transformers.GPT2Config(**values)


def random_model(spec: ModelSpec, seed: int = 0, *, eod_id: int = 7, pad_id: int = 5) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of ``spec`` (for tests and benchmarks)."""
    torch = require("torch", "torch")
    transformers = require("transformers", "torch")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_config(spec, eod_id, pad_id))
    return model.eval()


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    torch = require("torch", "torch")
    try:
        if path.suffix == ".safetensors":
            safetensors_torch = require("safetensors.torch", "torch")
            return safetensors_torch.load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types; report one line
        raise CheckpointError(f"cannot read weights {path}: {first_line(exc)}") from exc


def _normalise(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in state.items():
        if key.endswith(_LEGACY_SUFFIXES):
            continue
        if not (key.startswith("transformer.") or key.startswith("lm_head.")):
            key = "transformer." + key  # GPT2Model checkpoints have no prefix
        yield key, value


def load_model(
    checkpoint: Checkpoint | str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[GPT2LMHeadModel, CpmTokenizer]:
    """Load a checkpoint's model (eval mode) and tokenizer, checking that they fit together."""
    torch = require("torch", "torch")
    transformers = require("transformers", "torch")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    tokenizer = CpmTokenizer(ckpt.tokenizer_file)
    check_tokenizer_fits(tokenizer.vocab_size, ckpt.spec, ckpt.directory, tokenizer.path)

    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(hf_config(ckpt.spec, tokenizer.eod_id, tokenizer.pad_id, ckpt.config))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for shard in ckpt.weight_files:
        state.update(_normalise(_read_shard(shard)))
    if _TIED not in state and "transformer.wte.weight" in state:
        state[_TIED] = state["transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"weights in {ckpt.directory} do not match a GPT-2 of its config.json: {detail}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"weights in {ckpt.directory} do not match config.json: {key} is {tuple(state[key].shape)}, "
                f"expected {tuple(shape)}"
            )
    torch_dtype = getattr(torch, dtype)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, assign=True, strict=True)
    model.tie_weights()
    return model.to(device).eval(), tokenizer


def save_checkpoint(
    model: GPT2LMHeadModel, tokenizer_file: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Write an HF-style checkpoint (config.json, model.safetensors, generation_config.json, spiece.model)
    atomically: into a temporary sibling directory renamed at the end."""
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        write_checkpoint(model, tokenizer_file, tmp)
    return out


def write_checkpoint(model: GPT2LMHeadModel, tokenizer_file: str | os.PathLike[str], directory: Path) -> None:
    """The checkpoint files, written into an existing (staging) directory."""
    require("safetensors", "torch")
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k != _TIED and not k.endswith(_LEGACY_SUFFIXES)
    }
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = CpmTokenizer(tokenizer_file)
    generation = {
        "bos_token_id": tokenizer.eod_id,
        "eos_token_id": tokenizer.eod_id,
        "pad_token_id": tokenizer.pad_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    shutil.copyfile(tokenizer_file, directory / "spiece.model")
