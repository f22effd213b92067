"""llama.cpp's logits through llama-cpp-python, for ``peers_bench.py``'s quality rows (KL from float32, greedy).

    pip install 'cpm-infer[peers]'    # llama-cpp-python (built from its source distribution)

- ``LlamaCppRunner``: the ``cpm_infer.bench`` Runner protocol (prompt ids in, ``Timing`` out) over the
  low-level API: one ``llama_decode`` per step for the whole batch (one sequence id per row), greedy
  argmax over the returned logits in numpy, like our loop. ``logits_all`` scores a window (quality).

The GGUF files it reads come from llama.cpp's own ``convert_hf_to_gguf.py`` and ``llama-quantize``
(``llamacpp_native.py``). This module used to write them itself (``write_gguf``: our GGUF writer, with an
``output.weight`` copy of the tied embedding; ``quantize_gguf``: the quantizer through the binding) and its
runner timed llama.cpp's speed; both are gone: llama.cpp's speed is now timed by its own ``llama-bench`` /
``llama-batched-bench`` (``peers_bench.py``'s docstring says why the numbers moved), and the runner is kept
for quality only (logits, greedy tokens).
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from cpm_infer.bench.runners import Timing


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
