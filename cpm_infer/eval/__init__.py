"""Model quality on text: perplexity (``cpm eval ppl``) and zero-shot candidate scoring (``cpm eval score``).

Works on every backend: a ``Scorer`` (``logits_all``: torch, ort) scores a window in one forward pass;
any other ``Backend`` (TensorRT) is scored token by token through ``prefill`` + ``decode`` (teacher forcing);
anything else is refused with an ``EvalError``.
Imports numpy only; the runtime comes with the backend.
"""

from cpm_infer.eval.logprobs import EvalError, token_logprobs
from cpm_infer.eval.perplexity import PerplexityResult, load_documents, perplexity, read_documents
from cpm_infer.eval.zero_shot import ZeroShotResult, read_examples, score_examples

__all__ = [
    "EvalError",
    "PerplexityResult",
    "ZeroShotResult",
    "load_documents",
    "perplexity",
    "read_documents",
    "read_examples",
    "score_examples",
    "token_logprobs",
]
