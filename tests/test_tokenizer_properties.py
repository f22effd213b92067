"""Property-based tests: the tokenizer takes any ``str`` and round-trips what its vocabulary can represent."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpm_infer.text import REPLACEMENT, clean
from cpm_infer.tokenizer import CpmTokenizer

# jieba loads its dictionary on first use (seconds): no per-example deadline.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any code point at all, lone surrogates and control characters included.
ANY_TEXT = st.text(st.characters(), max_size=80)


@pytest.fixture(scope="module")
def real(shared_vocab: Path) -> CpmTokenizer:
    return CpmTokenizer(shared_vocab)


@pytest.fixture(scope="module")
def tiny(tiny_vocab: Path) -> CpmTokenizer:
    return CpmTokenizer(tiny_vocab)


def representable(tok: CpmTokenizer, candidates: set[str]) -> list[str]:
    """Characters the vocabulary represents on their own and that normalization leaves alone: no
    combining marks (they compose with a neighbour under NFKC), no ▂/▃ (the tokenizer's own space
    and newline markers), nothing NFKC rewrites, nothing that comes back as something else."""
    keep = []
    for ch in sorted(candidates):
        if ch in "\u2582\u2583" or unicodedata.category(ch).startswith(("M", "C")):
            continue
        if unicodedata.normalize("NFKC", ch) != ch or not ch.isprintable():
            continue
        if tok.decode(tok.encode(ch)) == ch and tok.unk_id not in tok.encode(ch):
            keep.append(ch)
    return [*keep, " ", "\n"]


def _never_crashes(tok: CpmTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert ids == tok.encode(clean(text))  # the tokenizer applies the one text policy itself
    assert tok.encode_batch([text, text]) == [ids, ids]
    out = tok.decode(ids)
    assert isinstance(out, str)
    out.encode("utf-8")  # never hands back a lone surrogate


@PROPERTY
@given(text=ANY_TEXT)
def test_real_vocab_never_crashes_on_any_str(real: CpmTokenizer, text: str) -> None:
    _never_crashes(real, text)


@PROPERTY
@given(text=ANY_TEXT)
def test_tiny_vocab_never_crashes_on_any_str(tiny: CpmTokenizer, text: str) -> None:
    _never_crashes(tiny, text)


@PROPERTY
@given(data=st.data())
def test_real_vocab_round_trips_representable_text(real: CpmTokenizer, data: st.DataObject) -> None:
    text = data.draw(_texts(real))
    assert real.decode(real.encode(text)) == text


@PROPERTY
@given(data=st.data())
def test_tiny_vocab_round_trips_representable_text(tiny: CpmTokenizer, data: st.DataObject) -> None:
    text = data.draw(_texts(tiny))
    assert tiny.decode(tiny.encode(text)) == text


@PROPERTY
@given(ids=st.lists(st.integers(min_value=0, max_value=29999), max_size=40))
def test_real_vocab_decodes_any_ids(real: CpmTokenizer, ids: list[int]) -> None:
    assert isinstance(real.decode(ids), str)


_TEXTS: dict[Path, st.SearchStrategy[str]] = {}


def _texts(tok: CpmTokenizer) -> st.SearchStrategy[str]:
    """Text over the representable characters among those the vocabulary's own pieces are made of."""
    if tok.path not in _TEXTS:
        chars = {ch for i in range(tok.vocab_size) for ch in tok.id_to_piece(i).lstrip("\u2581")}
        alphabet = representable(tok, chars)
        assert len(alphabet) > 20
        _TEXTS[tok.path] = st.text(st.sampled_from(alphabet), max_size=60)
    return _TEXTS[tok.path]


def test_lone_surrogate_is_replaced_with_a_warning(tiny: CpmTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cpm_infer.text"):
        ids = tiny.encode("天下\ud800大势")
    assert ids == tiny.encode(f"天下{REPLACEMENT}大势")
    assert "lone surrogate" in caplog.text and "text to tokenize" in caplog.text


def test_clean_joins_split_pairs_and_names_the_field(caplog: pytest.LogCaptureFixture) -> None:
    assert clean("abc") == "abc"
    assert clean("\ud83d\ude00") == "\U0001f600"  # a pair split into two code points is joined
    with caplog.at_level(logging.WARNING, logger="cpm_infer.text"):
        assert clean("a\udcffb\ud800", "request field 'prompt'") == f"a{REPLACEMENT}b{REPLACEMENT}"
    assert "request field 'prompt': 2 lone surrogate(s)" in caplog.text


def test_ids_outside_the_vocabulary_are_a_one_line_error(tiny: CpmTokenizer) -> None:
    from cpm_infer.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.decode([1, tiny.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.id_to_piece(-1)
