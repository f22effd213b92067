"""The generation loop: stopping, streaming, padding, seeds (scripted backend) and parity of the eager
backend with transformers' own generate()."""

from __future__ import annotations

import numpy as np
import pytest

from cpm_infer.config import GenerationConfig, ModelSpec
from cpm_infer.engine.generate import GenerationStats, PromptTooLongError, generate, left_pad, position_ids_from_mask

V = 20


class ScriptTok:
    eod_id, unk_id, pad_id, sep_id = 7, 0, 5, 4
    vocab_size = V

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


class ScriptBackend:
    """Emits, for each row, the next token of a per-prompt script (keyed by the prompt's last token);
    records the calls it gets so tests can check shapes, positions and row dropping."""

    name = "script"

    def __init__(self, scripts: dict[int, list[int]], n_positions: int = 64) -> None:
        self.scripts = scripts
        self.spec = ModelSpec(n_layer=1, n_head=1, n_embd=4, vocab_size=V, n_positions=n_positions)
        self.calls: list[tuple[str, tuple, np.ndarray]] = []

    def _logits(self, state):
        out = np.full((len(state), V), -5.0, dtype=np.float32)
        for row, (key, step) in enumerate(state):
            script = self.scripts[key]
            out[row, script[min(step, len(script) - 1)]] = 5.0
        return out

    def prefill(self, ids, mask, pos):
        self.calls.append(("prefill", ids.shape, pos.copy()))
        state = [(int(row[-1]), 0) for row in ids]
        return self._logits(state), state

    def decode(self, state, ids, mask, pos):
        self.calls.append(("decode", mask.shape, pos.copy()))
        state = [(key, step + 1) for key, step in state]
        return self._logits(state), state

    def select(self, state, rows, start=0):
        self.calls.append(("select", rows.shape, rows.copy()))
        return [state[i] for i in rows]

    def merge(self, state, other):
        self.calls.append(("merge", (len(state), len(other)), None))
        return state + other


GREEDY = GenerationConfig(temperature=0, max_new_tokens=10)


def test_left_pad_and_positions():
    ids, mask, pos = left_pad([[1, 2, 3], [4]], pad_id=5)
    assert ids.tolist() == [[1, 2, 3], [5, 5, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids_from_mask(np.array([[0, 1, 1, 1]])).tolist() == [[0, 0, 1, 2]]


def test_eod_stops_each_row_and_finished_rows_are_dropped():
    backend = ScriptBackend({1: [10, 11, 7, 12], 2: [13, 14, 15, 16, 17, 18]})
    results = generate(backend, [[3, 1], [2]], GREEDY.replace(max_new_tokens=5), ScriptTok())
    assert [r.token_ids for r in results] == [[10, 11], [13, 14, 15, 16, 17]]
    assert [r.finish_reason for r in results] == ["eos", "length"]
    assert [r.text for r in results] == ["kl", "nopqr"]
    selects = [c for c in backend.calls if c[0] == "select"]
    assert len(selects) == 1 and selects[0][2].tolist() == [1]
    # positions continue from each row's own length (row 1 was left-padded)
    decode_pos = [c[2].ravel().tolist() for c in backend.calls if c[0] == "decode"]
    assert decode_pos[0] == [2, 1] and decode_pos[-1] == [4]


def test_ignore_eos_and_min_new_tokens():
    backend = ScriptBackend({1: [7, 7, 7, 9]})
    assert generate(backend, [[1]], GREEDY.replace(max_new_tokens=4, ignore_eos=True), ScriptTok())[0].token_ids == [
        7,
        7,
        7,
        9,
    ]
    backend = ScriptBackend({1: [7, 7, 7, 9]})
    result = generate(backend, [[1]], GREEDY.replace(max_new_tokens=6, min_new_tokens=2), ScriptTok())[0]
    # <eod> is banned for the first two tokens, so the runner-up (-5.0 everywhere: id 1, the first
    # non-banned id; 0 is <unk>, banned) is chosen, then <eod> stops it
    assert result.token_ids == [1, 1] and result.finish_reason == "eos"


def test_stop_strings_cut_text_and_streaming_never_shows_them():
    backend = ScriptBackend({1: [10, 11, 12, 13, 14, 15]})  # k l m n o p
    pieces: list[tuple[int, str]] = []
    config = GREEDY.replace(stop_strings=("mn",))
    result = generate(backend, [[1]], config, ScriptTok(), callback=lambda i, t: pieces.append((i, t)))[0]
    assert result.text == "kl" and result.finish_reason == "stop"
    assert "".join(t for _, t in pieces) == "kl"


def test_streaming_concatenates_to_the_final_text():
    backend = ScriptBackend({1: [10, 11, 12], 2: [13, 14, 15, 16]})
    streamed: dict[int, str] = {}
    results = generate(
        backend,
        [[1], [2]],
        GREEDY.replace(max_new_tokens=4),
        ScriptTok(),
        callback=lambda i, t: streamed.__setitem__(i, streamed.get(i, "") + t),
    )
    assert streamed == {0: results[0].text, 1: results[1].text}
    assert results[0].text == "klmm"


def test_context_limit_stops_generation():
    backend = ScriptBackend({1: [10, 11, 12, 13]}, n_positions=6)
    result = generate(backend, [[2, 3, 1]], GREEDY.replace(max_new_tokens=50), ScriptTok())[0]
    assert result.finish_reason == "context" and len(result.token_ids) == 3


def test_prompt_longer_than_context_is_refused():
    backend = ScriptBackend({1: [10]}, n_positions=4)
    with pytest.raises(PromptTooLongError, match="--truncate"):
        generate(backend, [[1, 1, 1, 1]], GREEDY, ScriptTok())


def test_prompt_longer_than_the_backends_prefill_limit_is_refused():
    backend = ScriptBackend({1: [10]}, n_positions=16)
    backend.max_prompt = 3  # a TensorRT engine built with --max-input 3
    with pytest.raises(PromptTooLongError, match="at most 3"):
        generate(backend, [[1, 1, 1, 1]], GREEDY, ScriptTok())


def test_empty_prompt_starts_a_document():
    backend = ScriptBackend({7: [10, 11]})
    assert generate(backend, [[]], GREEDY.replace(max_new_tokens=2), ScriptTok())[0].token_ids == [10, 11]


def test_repetition_penalty_changes_greedy_choice():
    class Fixed(ScriptBackend):
        def _logits(self, state):
            out = np.zeros((len(state), V), dtype=np.float32)
            out[:, 10], out[:, 11] = 3.0, 2.0
            return out

    assert generate(Fixed({}), [[10]], GREEDY.replace(max_new_tokens=2), ScriptTok())[0].token_ids == [10, 10]
    penalised = generate(Fixed({}), [[10]], GREEDY.replace(max_new_tokens=2, repetition_penalty=2.0), ScriptTok())[0]
    assert penalised.token_ids == [11, 10]  # 10 is in the prompt: 3.0/2 < 2.0; then both are seen: 1.5 > 1.0


def test_stats_are_filled():
    stats = GenerationStats()
    generate(ScriptBackend({1: [10] * 5}), [[1]], GREEDY.replace(max_new_tokens=5), ScriptTok(), stats=stats)
    assert stats.batch_size == 1 and stats.new_tokens == 5 and len(stats.step_s) == 4 and stats.first_token_s > 0


# --- the eager PyTorch backend -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_model

    from cpm_infer.backends.torch_backend import TorchBackend

    model = make_tiny_model(vocab_size=96, seed=3, n_positions=128)
    return model, TorchBackend(model)


class TinyTok(ScriptTok):
    vocab_size = 96


def test_greedy_matches_transformers_generate(tiny):
    import torch

    model, backend = tiny
    prompts = [[11, 12, 13, 14, 15, 16], [20, 21, 22]]
    config = GenerationConfig(temperature=0, max_new_tokens=24, ban_unk=False, ignore_eos=True)
    ours = generate(backend, prompts, config, TinyTok())
    for prompt, result in zip(prompts, ours, strict=False):
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=5,
            eos_token_id=None,
        )
        assert result.token_ids == ref[0, len(prompt) :].tolist()
        assert len(set(result.token_ids)) > 4, "the tiny model must not just repeat one token"


def test_left_padded_batch_equals_rows_alone(tiny):
    _, backend = tiny
    prompts = [[11, 12, 13, 14, 15, 16, 17, 18], [20, 21], [30, 31, 32, 33]]
    config = GenerationConfig(temperature=0, max_new_tokens=16, ban_unk=False, ignore_eos=True)
    batched = [r.token_ids for r in generate(backend, prompts, config, TinyTok())]
    alone = [generate(backend, [p], config, TinyTok())[0].token_ids for p in prompts]
    assert batched == alone


def test_same_seed_same_samples_independent_of_batching(tiny):
    _, backend = tiny
    prompts = [[11, 12, 13], [20, 21, 22, 23]]
    config = GenerationConfig(
        temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=12, seed=42, num_samples=2, ignore_eos=True
    )
    first = [r.token_ids for r in generate(backend, prompts, config, TinyTok())]
    second = [r.token_ids for r in generate(backend, prompts, config, TinyTok())]
    assert first == second
    assert first[0] != first[1], "two samples of one prompt differ"
    one_by_one = [
        r.token_ids for i, p in enumerate(prompts) for r in generate(backend, [p], config, TinyTok(), index_offset=i)
    ]
    assert one_by_one == first
    other_seed = [r.token_ids for r in generate(backend, prompts, config.replace(seed=43), TinyTok())]
    assert other_seed != first


def test_rows_dropped_midway_keep_the_others_exact(tiny):
    _, backend = tiny
    prompts = [[11, 12, 13, 14], [20, 21, 22]]
    full = GenerationConfig(temperature=0, max_new_tokens=12, ban_unk=False, ignore_eos=True)
    ref = [r.token_ids for r in generate(backend, prompts, full, TinyTok())]
    # stop row 0 early with a stop string made of its 3rd token: the loop then drops it from the batch
    stop = TinyTok().decode([ref[0][2]])
    results = generate(backend, prompts, full.replace(stop_strings=(stop,)), TinyTok())
    assert results[0].finish_reason == "stop"
    if stop not in TinyTok().decode(ref[1]):
        assert results[1].token_ids == ref[1]


def test_stream_callback_gets_python_ints(tiny_checkpoint):
    """The callback's type says (int, str): a numpy integer would break json.dumps in callers."""
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    backend, tok = load_backend("torch", tiny_checkpoint)
    seen = []
    config = GenerationConfig(max_new_tokens=4, temperature=0, ignore_eos=True, ban_unk=False)
    generate(backend, [tok.encode("话说"), tok.encode("天下")], config, tok, callback=lambda i, t: seen.append((i, t)))
    assert seen and all(type(i) is int and isinstance(t, str) for i, t in seen)
    assert {i for i, _ in seen} == {0, 1}


def test_logprobs_equal_log_softmax_of_transformers_logits(tiny):
    """Each step's chosen-token logprob and top-N alternatives are the log-softmax of the model's raw
    logits (before penalties, bans and temperature)."""
    import torch

    model, backend = tiny
    prompt = [11, 12, 13, 14]
    config = GenerationConfig(
        temperature=0.7, top_p=0.8, repetition_penalty=1.3, max_new_tokens=8, seed=5, logprobs=4, ignore_eos=True
    )
    result = generate(backend, [prompt], config, TinyTok())[0]
    assert len(result.logprobs) == len(result.token_ids) == 8
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + result.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    for step, (token, info) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        row = reference[step]
        assert info.token_id == token and info.token_text == TinyTok().decode([token])
        assert info.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = torch.topk(row, 4)
        assert [i for i, _, _ in info.top] == top.indices.tolist()
        np.testing.assert_allclose([v for _, _, v in info.top], top.values.numpy(), atol=1e-4)
        assert [t for _, t, _ in info.top] == [TinyTok().decode([i]) for i in top.indices.tolist()]
