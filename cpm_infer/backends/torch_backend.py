"""Eager PyTorch backend: transformers' GPT2LMHeadModel with its DynamicCache (the baseline)."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from cpm_infer.backends.base import BackendClosedError
from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.devices import Device, resolve_device

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

log = logging.getLogger(__name__)


class TorchBackend:
    name = "torch"

    def __init__(self, model: GPT2LMHeadModel, *, device: str | None = None) -> None:
        self._torch = require("torch", "torch")
        self._model: GPT2LMHeadModel | None = model.eval()
        self.device = self._torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device)
        cfg = model.config
        self.spec = ModelSpec(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            vocab_size=cfg.vocab_size,
            n_positions=cfg.n_positions,
        )

    @property
    def model(self) -> GPT2LMHeadModel:
        if self._model is None:
            raise BackendClosedError("the torch backend is closed")
        return self._model

    def close(self) -> None:
        """Drop the model (its memory goes once no one else holds it) and torch's cached GPU blocks."""
        if self._model is None:
            return
        self._model = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def _tensor(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _forward(
        self, cache: Any, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, every=False
    ):
        with self._torch.inference_mode():
            out = self.model(
                input_ids=self._tensor(input_ids),
                attention_mask=self._tensor(attention_mask),
                position_ids=self._tensor(position_ids),
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if every else 1,
            )
            logits = out.logits if every else out.logits[:, -1, :]
        return logits.float().cpu().numpy(), out.cache

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        return self._forward(None, input_ids, attention_mask, position_ids)

    def decode(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        return self._forward(state, input_ids, attention_mask, position_ids)

    def extend(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        """T new tokens per row: transformers builds the causal mask from the cache's length (query i at P + i)."""
        return self._forward(state, input_ids, attention_mask, position_ids)

    def extend_all(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        """``extend`` with the logits of every new position (B, T, V): speculative decoding's verify pass."""
        return self._forward(state, input_ids, attention_mask, position_ids, every=True)

    def crop(self, state: Any, length: int) -> Any:
        """Views of the first ``length`` positions (no copy; the next step's concatenation makes new tensors)."""
        self.model  # noqa: B018 - raises BackendClosedError once closed
        for layer in state.layers:
            _check_length(length, layer.keys.shape[2])
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        return state

    def copy_rows(self, state: Any, rows: np.ndarray, *, start: int = 0, stop: int | None = None, room: int = 0) -> Any:
        """A new DynamicCache with copies (``index_select``) of ``rows``, positions ``start:stop``."""
        self.model  # noqa: B018 - raises BackendClosedError once closed
        index = self._torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        new = copy.copy(state)
        new.layers = []
        for layer in state.layers:
            mine = copy.copy(layer)
            mine.keys = layer.keys[:, :, start:stop].index_select(0, index)
            mine.values = layer.values[:, :, start:stop].index_select(0, index)
            new.layers.append(mine)
        return new

    def nbytes(self, state: Any) -> int:
        """Bytes of the storages the cache's tensors hold (a cropped view still holds its whole storage)."""
        storages = {}
        for layer in state.layers:
            for tensor in (layer.keys, layer.values):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def select(self, state: Any, rows: np.ndarray, *, start: int = 0) -> Any:
        self.model  # noqa: B018 - raises BackendClosedError once closed
        index = self._torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        for layer in state.layers:  # index_select copies, so repeated rows (beams) are independent
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        return state

    def merge(self, state: Any, other: Any) -> Any:
        """Concatenate the rows of two caches, left-padding the shorter with zeros (masked)."""
        self.model  # noqa: B018 - raises BackendClosedError once closed
        torch = self._torch
        for mine, theirs in zip(state.layers, other.layers, strict=True):
            length = max(mine.keys.shape[2], theirs.keys.shape[2])
            for name in ("keys", "values"):
                parts = [_pad_left(torch, getattr(layer, name), length) for layer in (mine, theirs)]
                setattr(mine, name, torch.cat(parts, dim=0))
        return state

    def logits_all(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits of every position (B, T, V) float32, no cache kept (scoring, ``cpm_infer.eval``)."""
        with self._torch.inference_mode():
            out = self.model(
                input_ids=self._tensor(input_ids),
                attention_mask=self._tensor(attention_mask),
                position_ids=self._tensor(position_ids),
                use_cache=False,
            )
            return out.logits.float().cpu().numpy()


def _check_length(length: int, past: int) -> None:
    if not 0 < length <= past:
        raise ValueError(f"crop: length {length} is outside a cache of {past} positions")


def _pad_left(torch: Any, tensor: Any, length: int) -> Any:
    """(B, nh, L, hs) -> (B, nh, length, hs) with zeros in front."""
    missing = length - tensor.shape[2]
    if missing <= 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))


def load(path, *, device: str | Device = "cpu", tokenizer_file=None, threads: int | None = None):
    """Open a Hugging Face checkpoint directory as a TorchBackend."""
    from cpm_infer.backends import BackendError
    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.torch_model import load_model

    torch = require("torch", "torch")
    if (path / "manifest.json").is_file():
        raise BackendError(
            f"{path} is an exported artifact; the torch backend needs a checkpoint directory (use --backend auto)"
        )
    target = str(resolve_device(device, "torch"))
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(open_checkpoint(path, tokenizer_file), device=target)
    return TorchBackend(model, device=target), tokenizer
