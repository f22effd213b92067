"""The prompt forms of the CPM seed projects."""

from __future__ import annotations

from cpm_infer.tokenizer import CpmTokenizer


def plain_prompt(tokenizer: CpmTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def essay_prompt(tokenizer: CpmTokenizer, title: str, context: str = "") -> list[int]:
    """``title <sep> context``: the essay format of yangjianxin1/CPM (training and generation)."""
    return [*tokenizer.encode(title), tokenizer.sep_id, *tokenizer.encode(context)]
