"""GPU memory a CPM model needs, computed from its shapes (not measured).

    python -m cpm_infer.memory [--batch 8] [--prompt 512] [--context 1024]

prints the README's table for every preset and precision. Terms, in bytes:

- weights: every parameter at the precision's size (LayerNorm parameters are counted at the same size:
  they are 0.01% of the total);
- KV cache: key and value of every layer for ``batch`` rows of ``context`` tokens, twice: the ORT
  (IO binding) and TensorRT backends ping-pong between two buffers, past and present;
- prefill activations, the largest transient of one step at ``batch`` x ``prompt`` tokens: float32
  logits of every position (the graph outputs them), float32 attention probabilities of one layer,
  and one layer's MLP input and output (4 x hidden wide).

Not counted: the CUDA context (~0.3-0.5 GB), allocator slack, TensorRT's tactic workspace while
building, cuBLAS workspaces. Treat the total as a floor.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cpm_infer.config import PRESETS, ModelSpec

BYTES = {"fp32": 4, "fp16": 2}


def parameters(spec: ModelSpec) -> int:
    """GPT-2 parameters: embeddings, 12 C^2 + 13 C per layer (qkv, proj, MLP, two LayerNorms), final norm."""
    c = spec.n_embd
    return spec.vocab_size * c + spec.n_positions * c + spec.n_layer * (12 * c * c + 13 * c) + 2 * c


@dataclass(frozen=True)
class GpuMemory:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def gpu_memory(spec: ModelSpec, precision: str, *, batch: int, prompt: int, context: int) -> GpuMemory:
    size = BYTES[precision]
    c = spec.n_embd
    kv = 2 * 2 * spec.n_layer * batch * context * c * size  # key + value, two buffers (ping-pong)
    logits = batch * prompt * spec.vocab_size * 4
    scores = batch * spec.n_head * prompt * prompt * 4
    mlp = 2 * batch * prompt * 4 * c * size
    return GpuMemory(parameters(spec) * size, kv, logits + scores + mlp)


def table(*, batch: int, prompt: int, context: int) -> str:
    gib = 2**30
    lines = [
        f"| model | precision | weights GiB | KV cache GiB (batch {batch} x {context}) | "
        f"prefill activations GiB (batch {batch} x {prompt}) | total GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in PRESETS.items():
        for precision in BYTES:
            m = gpu_memory(spec, precision, batch=batch, prompt=prompt, context=context)
            lines.append(
                f"| CPM-{name} | {precision} | {m.weights / gib:.2f} | {m.kv_cache / gib:.2f} | "
                f"{m.activations / gib:.2f} | {m.total / gib:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="GPU memory per CPM size and precision, from shapes.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512, help="Longest prompt prefilled at once.")
    parser.add_argument("--context", type=int, default=1024, help="Tokens of KV cache per row.")
    args = parser.parse_args()
    print(table(batch=args.batch, prompt=args.prompt, context=args.context))


if __name__ == "__main__":
    main()
