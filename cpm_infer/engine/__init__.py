"""The engine: the running batch (``core``), the rows' KV batch (``batch``), next-token choice (``chooser``,
``sampling``), beam search (``beam``), incremental detokenisation (``detok``) and ``generate()`` over it all.

Pure Python + numpy; never imports a runtime. The public names of ``core`` are re-exported here.
"""

from cpm_infer.engine.core import (
    Engine,
    FinishEvent,
    GenerationResult,
    PromptTooLongError,
    TokenEvent,
    TokenizerLike,
    check_prompt_length,
    make_rng,
    max_prompt_tokens,
)

__all__ = [
    "Engine",
    "FinishEvent",
    "GenerationResult",
    "PromptTooLongError",
    "TokenEvent",
    "TokenizerLike",
    "check_prompt_length",
    "make_rng",
    "max_prompt_tokens",
]
