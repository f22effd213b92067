"""An export-oriented GPT-2: transformers' GPT2LMHeadModel weights in a module written for ONNX.

Why our own module instead of wrapping GPT2LMHeadModel:
- transformers 5.x keeps the KV cache in a ``DynamicCache`` object (``cache=``; tuple caches fail)
  and builds masks in ``masking_utils`` through sdpa/flex code paths that change between releases.
  Tracing through them ties the export to one transformers version and needs cache (un)flattening
  shims. Here the KV contract of ``cpm_infer.kv`` is the forward signature itself: flat
  ``past_key_values.{i}.key|value`` in, ``present.{i}.key|value`` = concat(past, new) out.
- fp16 safety is ours to decide: LayerNorm and softmax run in float32 inside a half graph, and
  masking uses ``where(allowed, scores, -1e4)`` (a finite value, never added to scores), instead of
  ``finfo(dtype).min`` additions that overflow in half precision.
- the graph is plain MatMul/Add/LayerNormalization/Softmax, which ONNX Runtime's fusions and the
  TensorRT parser both understand.
The cost is keeping it equal to transformers: ``from_hf`` refuses config options it does not
implement, tests compare it with GPT2LMHeadModel, and every export is validated against
GPT2LMHeadModel itself (``export.validate``), never against this module.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch
from torch import nn
from torch.nn import functional as F

from cpm_infer.errors import CpmError
from cpm_infer.kv import MASK_VALUE  # finite, applied with where(): a fully masked (padded) row is uniform, not NaN

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")


class UnsupportedModelError(CpmError):
    """The checkpoint uses a GPT-2 option the exporter does not implement."""


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, written out so ORT recognises the FastGelu pattern.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, inner: int, eps: float, scaling: float, activation: str) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.eps, self.scaling = n_head, n_embd // n_head, eps, scaling
        self.activation = activation
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        # Conv1D layout (in, out) as in the checkpoint: y = x @ W + b.
        self.attn_w = nn.Parameter(torch.empty(n_embd, 3 * n_embd))
        self.attn_b = nn.Parameter(torch.empty(3 * n_embd))
        self.proj_w = nn.Parameter(torch.empty(n_embd, n_embd))
        self.proj_b = nn.Parameter(torch.empty(n_embd))
        self.fc_w = nn.Parameter(torch.empty(n_embd, inner))
        self.fc_b = nn.Parameter(torch.empty(inner))
        self.mlp_proj_w = nn.Parameter(torch.empty(inner, n_embd))
        self.mlp_proj_b = nn.Parameter(torch.empty(n_embd))

    def _norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the graph dtype (LayerNorm parameters are kept float32).
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, self.eps).to(x.dtype)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "gelu":
            return F.gelu(x)
        return _gelu_tanh(x)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        # x (B, T, C); allowed (B, 1, T, P+T) bool; past_k/v (B, nh, P, hs)
        batch, seq = x.shape[0], x.shape[1]
        qkv = self._norm(self.ln_1, x) @ self.attn_w + self.attn_b
        q, k, v = qkv.split(qkv.shape[-1] // 3, dim=2)
        q = q.reshape(batch, seq, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = torch.cat([past_k, k.reshape(batch, seq, self.n_head, self.head_dim).transpose(1, 2)], dim=2)
        v = torch.cat([past_v, v.reshape(batch, seq, self.n_head, self.head_dim).transpose(1, 2)], dim=2)
        # Scale q before the product (keeps half-precision scores small), softmax in float32.
        scores = ((q * self.scaling) @ k.transpose(-1, -2)).float()  # (B, nh, T, P+T)
        probs = torch.where(allowed, scores, MASK_VALUE).softmax(dim=-1).to(v.dtype)
        y = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)  # (B, T, C)
        x = x + (y @ self.proj_w + self.proj_b)
        h = self._act(self._norm(self.ln_2, x) @ self.fc_w + self.fc_b)
        x = x + (h @ self.mlp_proj_w + self.mlp_proj_b)
        return x, k, v


class ExportGPT2(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits float32, *present).

    ``past`` is flat: key 0, value 0, key 1, value 1, ... (``cpm_infer.kv.past_names`` order).
    """

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        n_embd: int,
        vocab_size: int,
        n_positions: int,
        *,
        inner: int,
        eps: float,
        activation: str,
        scalings: list[float],
    ) -> None:
        super().__init__()
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, n_embd // n_head
        self.wte = nn.Parameter(torch.empty(vocab_size, n_embd))
        self.wpe = nn.Parameter(torch.empty(n_positions, n_embd))
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, inner, eps, scalings[i], activation) for i in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)
        self.eps = eps
        # A zero bias makes the tied LM head export as Gemm(transB=1) on ``wte`` itself; without it the
        # exporter constant-folds a transposed copy of the embedding (+92 MB for CPM-small).
        self.register_buffer("lm_bias", torch.zeros(vocab_size), persistent=False)

    @classmethod
    def from_hf(cls, model: nn.Module, dtype: torch.dtype = torch.float32, *, take: bool = False) -> ExportGPT2:
        """An export module on a GPT2LMHeadModel's weights (LayerNorm parameters stay float32).

        Weights already in ``dtype`` are shared with ``model``, not copied; others are converted.
        ``take=True`` also empties ``model``'s parameters as they are taken (``model`` is unusable
        afterwards), so converting costs one tensor at a time rather than a second model."""
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention) cannot be exported")
        activation = cfg.activation_function
        if activation not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"GPT-2 activation {activation!r} is not supported by the exporter ({', '.join(_ACTIVATIONS)})"
            )
        head_dim = cfg.n_embd // cfg.n_head
        scalings = []
        for i in range(cfg.n_layer):
            s = head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            scalings.append(s / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else s)
        with torch.device("meta"):  # no storage: every parameter is assigned below
            module = cls(
                cfg.n_layer,
                cfg.n_head,
                cfg.n_embd,
                cfg.vocab_size,
                cfg.n_positions,
                inner=cfg.n_inner or 4 * cfg.n_embd,
                eps=cfg.layer_norm_epsilon,
                activation=activation,
                scalings=scalings,
            )
        device = next(model.parameters()).device

        def put(owner: nn.Module, name: str, source: nn.Parameter, keep_float32: bool = False) -> None:
            target = torch.float32 if keep_float32 else dtype
            with torch.no_grad():
                value = source.detach().to(target)  # the same tensor when already in ``target``
            setattr(owner, name, nn.Parameter(value, requires_grad=False))
            if take and value.data_ptr() != source.data_ptr():
                page_out(source)
                source.data = torch.empty(0, dtype=source.dtype, device=source.device)

        src = model.transformer
        put(module, "wpe", src.wpe.weight)
        norms = [(module.ln_f, src.ln_f)]
        for block, hf in zip(module.blocks, src.h, strict=True):
            norms += [(block.ln_1, hf.ln_1), (block.ln_2, hf.ln_2)]
        for norm, hf_norm in norms:
            put(norm, "weight", hf_norm.weight, keep_float32=True)
            put(norm, "bias", hf_norm.bias, keep_float32=True)
        for block, hf in zip(module.blocks, src.h, strict=True):
            for name, conv in (
                ("attn", hf.attn.c_attn),
                ("proj", hf.attn.c_proj),
                ("fc", hf.mlp.c_fc),
                ("mlp_proj", hf.mlp.c_proj),
            ):
                put(block, f"{name}_w", conv.weight)  # Conv1D layout (in, out), as the module uses it
                put(block, f"{name}_b", conv.bias)
        put(module, "wte", src.wte.weight)  # last: the tied LM head shares it
        module.lm_bias = torch.zeros(cfg.vocab_size, dtype=dtype, device=device)
        return module.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_and_keep: torch.Tensor,
    ):
        # The past keys and values (2 per layer), then optionally ``logits_to_keep`` (positional: the exporter
        # names inputs in order, and parameters follow them when they are exported as inputs).
        past, logits_to_keep = past_and_keep[: 2 * self.n_layer], None
        if len(past_and_keep) > 2 * self.n_layer:
            logits_to_keep = past_and_keep[2 * self.n_layer]
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        # Query i sits at absolute slot total - seq + i; it sees earlier slots that are not padding.
        causal = (
            torch.arange(total, device=input_ids.device)[None, :]
            <= (torch.arange(seq, device=input_ids.device) + (total - seq))[:, None]
        )  # (T, P+T)
        allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, P+T)
        x = self.wte[input_ids] + self.wpe[position_ids]  # (B, T, C)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = F.layer_norm(x.float(), self.ln_f.normalized_shape, self.ln_f.weight, self.ln_f.bias, self.eps).to(x.dtype)
        if logits_to_keep is not None:  # (1,) int64: the head only for the last n positions, 0 = every position
            n = torch.where(logits_to_keep > 0, torch.minimum(logits_to_keep, torch.tensor(seq)), torch.tensor(seq))
            x = torch.narrow(x, 1, seq - n[0], n[0])  # after ln_f, so the last Add + LayerNorm still fuse
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.wte, self.lm_bias)  # tied LM head, (B*T, V)
        logits = logits.reshape(x.shape[0], x.shape[1], -1).float()  # (B, T, V)
        return (logits, *presents)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        shape = (batch, self.n_head, 0, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.n_layer)]


_MADV_PAGEOUT = 21  # Linux 5.4+


def page_out(tensor: torch.Tensor) -> bool:
    """Ask the kernel to reclaim the pages of a CPU tensor about to be dropped (non-destructive).

    Checkpoint weights are memory-mapped from their safetensors file, and the map lives until the
    last tensor of the file is freed: converting them one by one (float16 export) would otherwise
    keep every float32 page resident next to the float16 copy. Clean file pages are dropped at once;
    anything else (heap memory, other systems) is left as it is. Returns whether the kernel took the hint."""
    if tensor.device.type != "cpu" or not tensor.numel():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last <= first:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(first, last - first, _MADV_PAGEOUT) == 0  # fails harmlessly where unsupported
    except (OSError, AttributeError):  # no C library to call (not a POSIX system)
        return False
