"""Beam search: token for token what transformers' generate(num_beams=...) returns on a tiny model."""

from __future__ import annotations

import pytest

from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine.generate import generate

pytest.importorskip("torch")


class Tok:
    unk_id, pad_id, sep_id = 0, 5, 4
    vocab_size = 96

    def __init__(self, eod_id: int) -> None:
        self.eod_id = eod_id

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_model

    from cpm_infer.backends.torch_backend import TorchBackend

    model = make_tiny_model(vocab_size=96, seed=7, n_positions=64)
    return model, TorchBackend(model)


def hf_beams(model, prompt, eos, **kwargs):
    import torch

    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=5,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    seqs = []
    for seq, n in zip(out.sequences.tolist(), lengths, strict=True):
        generated = seq[len(prompt) : len(prompt) + n]
        seqs.append(generated[:-1] if eos is not None and generated and generated[-1] == eos else generated)
    return seqs, out.sequences_scores.tolist()


def common_eos(backend, prompt):
    """A token the model actually produces a few steps in, so beams do end on <eod>."""
    ids = generate(
        backend, [prompt], GenerationConfig(temperature=0, max_new_tokens=6, ban_unk=False, ignore_eos=True), Tok(7)
    )[0].token_ids
    return ids[3]


@pytest.mark.parametrize(
    ("beams", "returns", "length_penalty", "early_stopping", "no_repeat", "rep"),
    [
        (4, 3, 1.0, True, 0, 1.0),
        (3, 3, 0.0, False, 2, 1.0),
        (5, 2, 2.0, False, 0, 1.4),
        (2, 2, -1.0, True, 3, 1.0),
    ],
)
@pytest.mark.parametrize("prompt", [[11, 12, 13], [40, 41, 42, 43, 44, 45]])
def test_beam_search_equals_transformers(tiny, prompt, beams, returns, length_penalty, early_stopping, no_repeat, rep):
    model, backend = tiny
    eos = common_eos(backend, prompt)
    config = GenerationConfig(
        temperature=0,
        max_new_tokens=12,
        num_beams=beams,
        num_return_sequences=returns,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat,
        repetition_penalty=rep,
        ban_unk=False,
    )
    ours = generate(backend, [prompt], config, Tok(eos))
    want, want_scores = hf_beams(
        model,
        prompt,
        eos,
        max_new_tokens=12,
        num_beams=beams,
        num_return_sequences=returns,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat,
        repetition_penalty=rep,
    )
    assert [r.token_ids for r in ours] == want
    assert [r.score for r in ours] == pytest.approx(want_scores, abs=1e-4)
    assert [r.sample_index for r in ours] == list(range(returns))
    assert any(r.finish_reason == "eos" for r in ours) or all(len(r.token_ids) == 12 for r in ours)


def test_some_beams_end_on_eos(tiny):
    _model, backend = tiny
    prompt = [11, 12, 13]
    eos = common_eos(backend, prompt)
    config = GenerationConfig(temperature=0, max_new_tokens=12, num_beams=4, num_return_sequences=4, ban_unk=False)
    reasons = {r.finish_reason for r in generate(backend, [prompt], config, Tok(eos))}
    assert "eos" in reasons


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"num_beams": 0}, "num_beams must be >= 1"),
        ({"num_beams": 2, "temperature": 0.7}, "cannot sample"),
        ({"num_beams": 2, "temperature": 0, "num_samples": 2}, "num_return_sequences"),
        ({"num_beams": 2, "temperature": 0, "num_return_sequences": 3}, "between 1 and num_beams"),
        ({"num_beams": 2, "temperature": 0, "stop_strings": ("x",)}, "stop_strings"),
        ({"num_beams": 2, "temperature": 0, "logprobs": 2}, "logprobs"),
    ],
)
def test_impossible_beam_settings_are_refused(changes, says):
    with pytest.raises(ConfigError, match=says):
        GenerationConfig(**changes)
