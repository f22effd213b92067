"""cpm eval: windows, perplexity on torch and ORT (they agree), teacher-forced fallback, zero-shot scoring,
bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tests.conftest import CORPUS

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def backends(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint on torch and as an ONNX artifact on onnxruntime."""
    pytest.importorskip("onnxruntime")
    from cpm_infer.backends import load_backend
    from export.onnx_export import export_onnx

    artifact = export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("eval") / "onnx").path
    torch_backend, tok = load_backend("torch", tiny_checkpoint)
    ort_backend, _ = load_backend("ort", artifact)
    return {"torch": torch_backend, "ort": ort_backend, "tok": tok, "artifact": artifact}


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(CORPUS + "\n\n" + CORPUS[:120], encoding="utf-8")  # two documents, the first longer than 128 tokens
    return path


@pytest.mark.parametrize(
    ("lengths", "window", "stride"), [([1, 2, 5], 4, 2), ([300], 128, 64), ([129, 128, 127], 128, 127), ([50], 8, 1)]
)
def test_windows_predict_every_token_once(lengths, window, stride):
    from cpm_infer.eval.perplexity import plan_windows

    seen = {doc: [] for doc in range(len(lengths))}
    for w in plan_windows(lengths, window, stride):
        assert 0 <= w.start < w.scored_from <= w.end <= lengths[w.doc] and w.end - w.start <= window
        if w.start > 0:
            assert w.end - w.start == window  # later windows are full length: the most context
        seen[w.doc] += range(w.scored_from, w.end)
    for doc, n in enumerate(lengths):
        assert seen[doc] == list(range(1, n))


def test_log_softmax_at_hand_computed():
    from cpm_infer.eval.logprobs import log_softmax_at

    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=np.float32)
    np.testing.assert_allclose(log_softmax_at(logits, np.array([1, 0])), [math.log(0.5), math.log(0.75)], rtol=1e-6)


def test_perplexity_torch_and_ort_agree(backends, text_file):
    from cpm_infer.eval import perplexity, read_documents

    docs = read_documents(text_file)
    assert len(docs) == 2
    results = {name: perplexity(backends[name], backends["tok"], docs, stride=48) for name in ("torch", "ort")}
    t, o = results["torch"], results["ort"]
    assert t.tokens == o.tokens == sum(len(backends["tok"].encode(d.content)) - 1 for d in docs)
    assert t.windows > 2 and t.window == 128 and t.stride == 48
    assert o.perplexity == pytest.approx(t.perplexity, rel=1e-4)
    assert o.tokens_per_s > 0


def test_perplexity_matches_direct_computation(backends):
    """One window: exp(mean NLL) computed straight from the model's logits."""
    import torch

    from cpm_infer.eval import perplexity
    from cpm_infer.eval.perplexity import Document

    tok, model = backends["tok"], backends["torch"].model
    ids = tok.encode(CORPUS[:80])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="mean").item()
    result = perplexity(backends["torch"], tok, [Document(CORPUS[:80])])
    assert result.windows == 1 and result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_teacher_forced_fallback_matches_one_pass(backends):
    """A backend without logits_all (e.g. TensorRT) is scored through prefill + decode: same numbers."""
    from cpm_infer.eval import token_logprobs

    class Plain:  # only the Backend protocol
        def __init__(self, inner):
            self.inner, self.spec, self.name = inner, inner.spec, "plain"

        def prefill(self, *args):
            return self.inner.prefill(*args)

        def decode(self, *args):
            return self.inner.decode(*args)

        def select(self, *args):
            return self.inner.select(*args)

    ids = np.array([backends["tok"].encode(CORPUS[:60])[:30]] * 2)
    fast = token_logprobs(backends["ort"], ids)
    slow = token_logprobs(Plain(backends["ort"]), ids)
    assert fast.shape == (2, 29)
    np.testing.assert_allclose(slow, fast, atol=1e-4)


def test_zero_shot_prefers_the_models_own_continuation(backends):
    """The greedy continuation is, by construction, more likely than unrelated token strings."""
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from cpm_infer.eval.zero_shot import Example, score_examples

    tok, backend = backends["tok"], backends["ort"]
    prompt = "话说天下大势，分久必合"
    greedy = generate(
        backend,
        [tok.encode(prompt)],
        GenerationConfig(temperature=0, max_new_tokens=6, ignore_eos=True, ban_unk=True),
        tok,
    )[0]
    own = tok.decode(greedy.token_ids)
    assert own.strip()
    rng = np.random.default_rng(0)
    others = [tok.decode(rng.integers(10, tok.vocab_size, size=6).tolist()) for _ in range(3)]
    example = Example({"text": prompt}, [others[0], own, others[1], others[2]], 1, None, "x.jsonl:1")
    result = score_examples(backend, tok, [example], scope="candidate")
    assert result.scores[0].predicted == 1 and result.accuracy == 1.0
    assert result.scores[0].losses[1] == min(result.scores[0].losses)


def test_zero_shot_torch_and_ort_agree(backends, tmp_path):
    from cpm_infer.eval import read_examples, score_examples

    path = tmp_path / "ex.jsonl"
    rows = [
        {"text": "话说天下大势", "candidates": ["分久必合", "白发渔樵"], "label": "分久必合"},
        {"text": "青山依旧在", "candidates": ["几度夕阳红", "一壶浊酒", "秋月春风"], "label": 0},
        {"text": "汉朝", "candidates": ["自高祖", "光武中兴"]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    examples = read_examples(path)
    assert [e.label for e in examples] == [0, 0, None]
    t = score_examples(backends["torch"], backends["tok"], examples, template="{text}，{candidate}。")
    o = score_examples(backends["ort"], backends["tok"], examples, template="{text}，{candidate}。")
    for a, b in zip(t.scores, o.scores, strict=True):
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4)
        assert a.predicted == b.predicted == int(np.argmin(a.losses))
    assert t.accuracy in (0.0, 0.5, 1.0) and t.to_dict()["examples"][2]["correct"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file holds no text: no usable documents"),
        ("\n \n\n\t\n", "the file holds no text: no usable documents"),
    ],
)
def test_eval_file_without_text_refused(tmp_path, content, message):
    from cpm_infer.documents import DataError
    from cpm_infer.eval import read_documents

    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_documents(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "x"}', 'needs string fields "content"'),
        ("not json", "invalid JSON"),
    ],
)
def test_bad_jsonl_skipped_or_refused(tmp_path, line, message):
    from cpm_infer.documents import DataError
    from cpm_infer.eval import load_documents

    path = tmp_path / "bad.jsonl"
    path.write_text(line + '\n{"text": "好的一行"}\n', encoding="utf-8")
    docs, summary = load_documents(path)
    assert [d.content for d in docs] == ["好的一行"] and summary.read == 2 and summary.kept == 1
    with pytest.raises(DataError, match=rf"bad.jsonl:1: .*{message}"):
        load_documents(path, strict=True)


@pytest.mark.parametrize(
    ("row", "template", "message"),
    [
        ({"text": "a", "candidates": ["x"]}, None, "at least 2 non-empty strings"),
        ({"text": "a", "candidates": ["x", "y"], "label": "z"}, None, "neither one of the candidates"),
        ({"text": "a", "candidates": ["x", "y"]}, "{text}", "exactly once"),
        ({"text": "a", "candidates": ["x", "y"]}, "{question}{candidate}", "cannot be filled"),
    ],
)
def test_bad_examples_refused(backends, tmp_path, row, template, message):
    from cpm_infer.eval import EvalError, read_examples, score_examples

    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(EvalError, match=message):
        score_examples(backends["ort"], backends["tok"], read_examples(path), template=template)


def test_cli_ppl_and_score(backends, tiny_checkpoint, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "eval", "ppl", str(backends["artifact"]), str(text_file), "--json", str(out)
    )
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["backend"] == "ort" and f"perplexity {data['perplexity']:.3f}" in stdout and "tokens/s" in stdout
    code, stdout, err = run_cli(
        monkeypatch, capsys, "eval", "ppl", str(tiny_checkpoint), str(text_file), "--window", "64"
    )
    assert code == 0 and "torch backend" in stdout and "window(s) of 64" in stdout, err

    examples = tmp_path / "ex.jsonl"
    examples.write_text(
        json.dumps({"text": "话说", "candidates": ["天下", "秋月"], "label": 0}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "score",
        str(backends["artifact"]),
        str(examples),
        "--template",
        "{text}{candidate}大势",
    )
    assert code == 0 and "accuracy" in stdout, err


def test_cli_empty_file_one_line_error(backends, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "ppl", str(backends["artifact"]), str(empty))
    assert code == 1 and err == f"error: {empty}:1: the file holds no text: no usable documents\n"
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", "score", str(backends["artifact"]), str(empty), "--scope", "tokens"
    )
    assert code == 1 and err.startswith("error: unknown --scope 'tokens'") and err.count("\n") == 1


def test_log_softmax_at_row_chunks_give_the_same_values():
    """Rows are scored a chunk at a time (bounded temporaries): any chunk size gives the same numbers."""
    from cpm_infer.eval.logprobs import log_softmax_at

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((130, 50)).astype(np.float32) * 5
    targets = rng.integers(0, 50, 130)
    whole = log_softmax_at(logits, targets, rows=1000)
    for rows in (1, 7, 64):
        np.testing.assert_array_equal(log_softmax_at(logits, targets, rows=rows), whole)
    expected = logits[np.arange(130), targets] - np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(whole, expected, rtol=1e-5)
