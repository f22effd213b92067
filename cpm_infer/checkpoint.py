"""Find and describe Hugging Face GPT-2 checkpoint directories (no torch needed here).

A checkpoint directory holds ``config.json`` (model_type gpt2), weights as ``model.safetensors``,
sharded safetensors (``model.safetensors.index.json``), or ``pytorch_model.bin`` (possibly sharded),
and a CPM tokenizer file (``spiece.model`` or ``chinese_vocab.model``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cpm_infer.artifact import read_json, sha256_files
from cpm_infer.config import ConfigError, ModelSpec
from cpm_infer.errors import CpmError
from cpm_infer.tokenizer import TOKENIZER_FILENAMES, find_tokenizer_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(CpmError):
    """A checkpoint directory is missing, incomplete, corrupt or not a GPT-2."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    config: dict
    spec: ModelSpec
    weight_files: tuple[Path, ...]
    tokenizer_file: Path

    @property
    def format(self) -> str:
        return "safetensors" if self.weight_files[0].suffix == ".safetensors" else "torch"

    def weights_sha256(self) -> str:
        """One digest over all weight files, in order (identifies the exact weights exported)."""
        return sha256_files(self.weight_files)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: no config.json")
    config = read_json(path, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def spec_from_config(config: dict, where: Path) -> ModelSpec:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "gpt2" and not any(str(a).startswith("GPT2") for a in archs):
        raise CheckpointError(
            f"{where} holds a {model_type or 'unknown'!s} model; cpm-infer serves GPT-2 (CPM) checkpoints"
        )

    def field(*keys: str, default: int | None = None) -> int:
        key = next((k for k in keys if k in config), keys[0])
        value = config.get(key, default)
        if value is None:
            raise CheckpointError(f"{where}/config.json has no {key!r} (a GPT-2 config needs it)")
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise CheckpointError(f"{where}/config.json: {key!r} must be an integer, got {value!r}")
        return int(value)

    try:
        return ModelSpec(
            n_layer=field("n_layer"),
            n_head=field("n_head"),
            n_embd=field("n_embd"),
            vocab_size=field("vocab_size"),
            n_positions=field("n_positions", "n_ctx", default=1024),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{where}/config.json: {exc}") from exc


def find_weights(directory: Path) -> tuple[Path, ...]:
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"cannot read shard index {index}: {exc}") from exc
            shards = tuple(directory / name for name in sorted(set(weight_map.values())))
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
            return shards
    for name in (SAFETENSORS, TORCH_BIN):
        if (directory / name).is_file():
            return (directory / name,)
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or {TORCH_BIN_INDEX}"
    )


def open_checkpoint(
    directory: str | os.PathLike[str], tokenizer_file: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """Locate config, weights and tokenizer of a checkpoint; read nothing heavy."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"model path is not a directory: {path}")
    config = read_config(path)
    spec = spec_from_config(config, path)
    weights = find_weights(path)
    if tokenizer_file is not None:
        tok = Path(tokenizer_file)
        if not tok.is_file():
            raise CheckpointError(f"tokenizer file not found: {tok}")
    else:
        found = find_tokenizer_file(path)
        if found is None:
            raise CheckpointError(
                f"no tokenizer ({' or '.join(TOKENIZER_FILENAMES)}) in {path}; pass one with --tokenizer"
            )
        tok = found
    return Checkpoint(directory=path, config=config, spec=spec, weight_files=weights, tokenizer_file=tok)


# Padded vocabularies round the embedding up to a multiple of 64 or 128 rows; a tokenizer that leaves
# more rows than that unused is another model's.
MAX_UNUSED_ROWS = 127


def check_tokenizer_fits(
    tokenizer_size: int, spec: ModelSpec, where: Path | str, tokenizer_file: Path | str | None = None
) -> None:
    """A tokenizer larger than the embedding would produce ids the model cannot embed; one much smaller
    belongs to another model (its ids would mean other pieces)."""
    named = f"tokenizer {tokenizer_file}" if tokenizer_file else "tokenizer"
    if tokenizer_size > spec.vocab_size:
        raise CheckpointError(
            f"{named} has {tokenizer_size} pieces but the model at {where} embeds only {spec.vocab_size}: "
            "wrong tokenizer for this model"
        )
    if spec.vocab_size - tokenizer_size > MAX_UNUSED_ROWS:
        raise CheckpointError(
            f"{named} has {tokenizer_size} pieces but the model at {where} embeds {spec.vocab_size}: "
            "wrong tokenizer for this model"
        )
