"""Distil a teacher CPM into a student with fewer layers (initialised from teacher layers).

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * LM cross-entropy, both summed over
the labelled positions (T: temperature; the T^2 keeps KD gradients on the scale of the LM loss,
Hinton et al. 2015). Held-out evaluation reports the student's LM loss (perplexity).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from cpm_infer.checkpoint import open_checkpoint
from cpm_infer.config import ModelSpec
from trainer.batches import IGNORE
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.finetune import lm_loss_sum
from trainer.loop import Callbacks, RunResult, run
from trainer.prepare import RunSetup, check_vocab
from trainer.windows import Progress

log = logging.getLogger(__name__)


def pick_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (12 -> 4: [0, 4, 7, 11])."""
    if not 1 <= student_layers <= teacher_layers:
        raise TrainError(
            f"the student needs between 1 and {teacher_layers} layers (the teacher's), got {student_layers}"
        )
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def student_layer_map(teacher_layers: int, student_layers: int | None, layer_map: Sequence[int] | None) -> list[int]:
    """The teacher layers the student starts from: ``layer_map`` as given (checked), else ``student_layers``
    (default: half the teacher's) picked evenly."""
    if not layer_map:
        return pick_layers(teacher_layers, student_layers or max(1, teacher_layers // 2))
    layers = list(layer_map)
    if sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= teacher_layers:
        raise TrainError(
            f"layer map must be increasing teacher layer indices in [0, {teacher_layers - 1}], got {layers}"
        )
    return layers


def student_from_teacher(teacher, layers: Sequence[int]):
    """A GPT-2 with the teacher's embeddings, final LayerNorm and the chosen blocks (copied)."""
    import copy

    import torch

    config = copy.deepcopy(teacher.config)
    config.n_layer = len(layers)
    student = type(teacher)(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("transformer.h."):
            index, rest = key[len("transformer.h.") :].split(".", 1)
            if int(index) in layers:
                state[f"transformer.h.{layers.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    with torch.no_grad():
        student.load_state_dict(state, strict=True)
    student.tie_weights()
    return student


class Distillation:
    def __init__(self, teacher, temperature: float, alpha: float) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha

    def loss(self, model, batch: dict, eval_mode: bool = False):
        import torch
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        lm, count = lm_loss_sum(logits, batch["labels"])
        if eval_mode or self.alpha == 0:
            return lm, count
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
        keep = batch["labels"][:, 1:] != IGNORE  # (B, T-1): the positions that predict a token
        t = self.temperature
        student_logp = F.log_softmax(logits[:, :-1][keep].float() / t, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits[:, :-1][keep].float() / t, dim=-1)
        kd = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * (t * t)
        return self.alpha * kd + (1 - self.alpha) * lm, count


def distill(
    cfg: TrainConfig,
    *,
    teacher_dir: str | os.PathLike[str],
    student_layers: int | None = None,
    layer_map: Sequence[int] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    callbacks: Callbacks | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Train a student of ``student_layers`` (or the teacher layers in ``layer_map``) on ``cfg.data``."""
    from cpm_infer.torch_model import load_model

    if not temperature > 0:
        raise TrainError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise TrainError(f"alpha (the KD weight) must be in [0, 1], got {alpha}")
    setup = RunSetup(cfg, callbacks, progress)
    ckpt = open_checkpoint(teacher_dir)
    teacher, tokenizer = load_model(ckpt)
    check_vocab(tokenizer, ckpt.spec, teacher_dir)
    layers = student_layer_map(ckpt.spec.n_layer, student_layers, layer_map)
    data = setup.load_data(tokenizer, ckpt.spec.n_positions)
    if setup.resume is not None:
        student, _ = load_model(setup.resume)
        if student.config.n_layer != len(layers):
            raise TrainError(f"{setup.resume} has {student.config.n_layer} layers, not the {len(layers)} asked for")
    else:
        student = student_from_teacher(teacher, layers)
    teacher.to(setup.accelerator.device).eval().requires_grad_(False)
    arguments = setup.loop_arguments(
        ModelSpec.from_dict({**ckpt.spec.to_dict(), "n_layer": len(layers)}),
        "distill",
        teacher=ckpt.weights_sha256(),
        layers=layers,
        temperature=temperature,
        alpha=alpha,
    )
    log.info("distilling teacher layers %s of %d into a %d-layer student", layers, ckpt.spec.n_layer, len(layers))
    return run(student, Distillation(teacher, temperature, alpha), data, cfg, **arguments)
