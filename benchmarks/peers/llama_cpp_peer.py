"""llama.cpp as a peer: GGUF written from our checkpoint with the ``gguf`` package, run with llama-cpp-python.

    pip install 'cpm-infer[peers]'    # llama-cpp-python (built from its source distribution) and gguf

- ``write_gguf``: a CPM checkpoint (Hugging Face GPT-2 layout) -> a float32 GGUF of llama.cpp's ``gpt2``
  architecture, tensors named and laid out as llama.cpp's own ``convert_hf_to_gguf.py`` writes GPT-2
  (Conv1D weights transposed to (out, in), the tied LM head stored as ``output.weight``). The vocabulary is
  CPM's SentencePiece pieces as a ``llama`` (SPM) tokenizer: benchmarks feed token ids, so it only has to
  load.
- ``quantize_gguf``: llama.cpp's own quantizer (what ``llama-quantize`` runs) to q8_0 / q4_0 with its
  default per-tensor recipe (e.g. the LM head of a q4_0 file becomes q6_K, as users get it).
- ``LlamaCppRunner``: the ``cpm_infer.bench`` Runner protocol (prompt ids in, ``Timing`` out) over the
  low-level API: one ``llama_decode`` per step for the whole batch (one sequence id per row), greedy
  argmax over the returned logits in numpy, like our loop. ``logits_all`` scores a window (quality).
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from cpm_infer.bench.runners import Timing

FTYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}  # llama_ftype: ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _tensor_name(hf_name: str) -> str | None:
    """HF GPT-2 parameter name -> llama.cpp GGUF tensor name (None: not stored)."""
    name = hf_name.removeprefix("transformer.")
    fixed = {
        "wte.weight": "token_embd.weight",
        "wpe.weight": "position_embd.weight",
        "ln_f.weight": "output_norm.weight",
        "ln_f.bias": "output_norm.bias",
    }
    if name in fixed:
        return fixed[name]
    if not name.startswith("h."):
        return None  # lm_head.weight (tied: written from wte), attn.bias buffers
    _, layer, rest = name.split(".", 2)
    parts = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{parts[module]}.{kind}" if module in parts else None


def write_gguf(checkpoint: Path, out: Path) -> Path:
    """A float32 GGUF of ``checkpoint`` (reused when ``out`` exists)."""
    if out.is_file():
        return out
    import gguf

    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.torch_model import load_model

    model, tok = load_model(checkpoint)
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(FTYPES["f32"])
    pieces, scores, types = _vocabulary(open_checkpoint(checkpoint).tokenizer_file, config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.eod_id)
    writer.add_eos_token_id(tok.eod_id)
    writer.add_unk_token_id(tok.unk_id)
    writer.add_add_bos_token(False)
    for hf_name, array in state.items():
        name = _tensor_name(hf_name)
        if name is None:
            continue
        if hf_name.endswith(CONV1D):
            array = array.T  # HF Conv1D (in, out) -> (out, in)
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        if name == "token_embd.weight":  # tied LM head, as convert_hf_to_gguf.py writes GPT-2
            writer.add_tensor("output.weight", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _vocabulary(tokenizer_file: Path, size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces, scores and GGUF token types by id, padded up to the model's vocab size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    pieces, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 1)  # UNKNOWN, CONTROL, NORMAL
    for i in range(len(pieces), size):
        pieces.append(f"<unused_{i}>")
        scores.append(-1e9)
        types.append(5)  # UNUSED
    return pieces, scores, types


def quantize_gguf(source: Path, out: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's quantizer with its default recipe for ``ftype`` (reused when ``out`` exists)."""
    if out.is_file():
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} -> {ftype}) failed with status {status}")
    tmp.replace(out)
    return out


def _silence(level, text, user_data) -> None:  # llama.cpp logs every load to stderr otherwise
    return None


class LlamaCppRunner:
    """A llama.cpp context behind the harness's Runner protocol."""

    def __init__(self, name: str, gguf_path: Path, *, threads: int, n_ctx: int, max_rows: int = 8) -> None:
        import llama_cpp

        self.name, self.lib, self.max_rows = name, llama_cpp, max_rows
        llama_cpp.llama_backend_init()
        self._log_cb = llama_cpp.llama_log_callback(_silence)  # kept alive as long as the runner
        llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p())
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * max_rows
        cparams.n_batch = cparams.n_ubatch = max(n_ctx, 512)
        cparams.n_seq_max = max_rows
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot create a context for {gguf_path}")
        self.batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)
        self.n_batch = cparams.n_batch
        self.last_tokens: np.ndarray | None = None

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants_logits) entries."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(tokens)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _logits(self, index: int) -> np.ndarray:
        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        rows, prompt_len = prompts.shape
        if rows > self.max_rows:
            raise ValueError(f"{self.name}: batch {rows} > {self.max_rows} sequences")
        self._clear()
        start = time.perf_counter()
        entries = [(int(prompts[r, t]), t, r, t == prompt_len - 1) for r in range(rows) for t in range(prompt_len)]
        if len(entries) > self.n_batch:
            raise ValueError(f"{self.name}: prefill of {len(entries)} tokens > n_batch {self.n_batch}")
        self._decode(entries)  # the prompts of all rows in one call
        last = [r * prompt_len + prompt_len - 1 for r in range(rows)]
        tokens = np.array([int(np.argmax(self._logits(i))) for i in last])
        stamps = [time.perf_counter()]
        out = [tokens]
        for step in range(1, new_tokens):
            self._decode([(int(tokens[r]), prompt_len + step - 1, r, True) for r in range(rows)])
            tokens = np.array([int(np.argmax(self._logits(r))) for r in range(rows)])
            stamps.append(time.perf_counter())
            out.append(tokens)
        self.last_tokens = np.stack(out, axis=1)
        return Timing(stamps[0] - start, list(np.diff(stamps)), rows * new_tokens)

    def logits_all(self, ids: np.ndarray) -> np.ndarray:
        """Logits (T, V) float32 of every position of one sequence, from an empty cache."""
        self._clear()
        if len(ids) > self.n_batch:
            raise ValueError(f"{self.name}: window {len(ids)} > n_batch {self.n_batch}")
        self._decode([(int(t), i, 0, True) for i, t in enumerate(ids)])
        pointer = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(len(ids), self.n_vocab)).copy()
