"""Fine-tune a CPM checkpoint (or train a fresh one) with the language-model loss."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cpm_infer.checkpoint import open_checkpoint
from cpm_infer.config import ModelSpec
from cpm_infer.tokenizer import CpmTokenizer
from trainer.batches import IGNORE
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.loop import Callbacks, RunResult, run
from trainer.prepare import RunSetup, check_vocab
from trainer.windows import Progress

log = logging.getLogger(__name__)


def lm_loss_sum(logits, labels):
    """(sum of next-token cross-entropies over labelled positions, their count)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (shift_labels != IGNORE).sum()


class LanguageModeling:
    """The plain LM objective."""

    def loss(self, model, batch: dict, eval_mode: bool = False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return lm_loss_sum(logits, batch["labels"])


def finetune(
    cfg: TrainConfig,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    new_spec: ModelSpec | None = None,
    tokenizer_file: str | os.PathLike[str] | None = None,
    new_config: dict | None = None,
    callbacks: Callbacks | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Fine-tune ``model_dir``, or train a fresh ``new_spec`` model with ``tokenizer_file``
    (``new_config``: GPT2Config overrides for it, e.g. ``{"resid_pdrop": 0.0}``).

    With ``cfg.resume`` the weights, tokenizer and training state come from ``cfg.output/last``;
    the given model must still be the one the run started from.
    """
    from cpm_infer.torch_model import load_model

    if (model_dir is None) == (new_spec is None):
        raise TrainError("give either a model to fine-tune or the shape of a new model (with a tokenizer)")
    setup = RunSetup(cfg, callbacks, progress)
    if model_dir is not None:
        ckpt = open_checkpoint(model_dir, tokenizer_file)
        spec, tok_path = ckpt.spec, ckpt.tokenizer_file
        init = {"init": "checkpoint", "init_weights": ckpt.weights_sha256()}
    else:
        if tokenizer_file is None:
            raise TrainError("a new model needs a tokenizer file (--tokenizer)")
        tok_path = Path(tokenizer_file)
        spec = new_spec
        init = {"init": "random", "init_seed": cfg.seed, "init_config": dict(sorted((new_config or {}).items()))}
    tokenizer = CpmTokenizer(tok_path)
    check_vocab(tokenizer, spec, model_dir or tok_path)
    data = setup.load_data(tokenizer, spec.n_positions)

    if setup.resume is not None:
        model, _ = load_model(setup.resume)
    elif model_dir is not None:
        model, _ = load_model(ckpt)
    else:
        model = new_model(spec, tokenizer, cfg.seed, new_config)
    arguments = setup.loop_arguments(spec, "lm", **init)
    log.info(
        "training %s parameters on %s", f"{sum(p.numel() for p in model.parameters()):,}", setup.accelerator.device
    )
    return run(model, LanguageModeling(), data, cfg, **arguments)


def new_model(spec: ModelSpec, tokenizer: CpmTokenizer, seed: int, overrides: dict | None = None):
    """A freshly initialised CPM-layout GPT-2 (seeded)."""
    import torch
    import transformers

    from cpm_infer.torch_model import hf_config

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_config(spec, tokenizer.eod_id, tokenizer.pad_id, base=overrides))
