"""CPM tokenizer: reproduces the token ids of the original CPM-Generate algorithm.

Encode: ``jieba.cut(text, cut_all=False)`` -> each piece maps ``' '`` to U+2582 and ``'\\n'`` to
U+2583 -> pieces joined by ``' '`` -> SentencePiece ``encode``. Decode reverses it: SentencePiece
``decode`` -> drop ``' '`` -> U+2582 back to space, U+2583 back to newline.

transformers' ``CpmTokenizer`` no longer does the jieba cut nor the space/newline mapping, so its
ids differ from what CPM was trained on; this class is the project's single source of truth.

Any ``str`` is accepted: lone surrogates (which SentencePiece cannot take) become U+FFFD with a
warning, by the project's one text policy (``cpm_infer.text.clean``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cpm_infer.errors import CpmError, first_line
from cpm_infer.text import clean

log = logging.getLogger(__name__)

TOKENIZER_FILENAMES = ("spiece.model", "chinese_vocab.model", "tokenizer.model")

_ENCODE_MAP = str.maketrans({" ": "\u2582", "\n": "\u2583"})
_DECODE_MAP = str.maketrans({"\u2582": " ", "\u2583": "\n"})

SPECIAL_PIECES = {"unk": "<unk>", "sep": "<sep>", "pad": "<pad>", "eod": "<eod>"}


class TokenizerError(CpmError):
    """A tokenizer file is missing, unreadable, or lacks CPM's special pieces."""


def _jieba():
    """Import jieba once, quietly (it logs its dictionary loading to stderr at DEBUG)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


class CpmTokenizer:
    """Exact CPM tokenization over any CPM-style SentencePiece model file."""

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {first_line(exc)}") from exc
        ids = {}
        for name, piece in SPECIAL_PIECES.items():
            pid = self._sp.PieceToId(piece)
            if self._sp.IdToPiece(pid) != piece:
                raise TokenizerError(f"{path} has no {piece} piece: not a CPM-style vocabulary")
            ids[name] = pid
        self.unk_id: int = ids["unk"]
        self.sep_id: int = ids["sep"]
        self.pad_id: int = ids["pad"]
        self.eod_id: int = ids["eod"]
        self._size: int = self._sp.GetPieceSize()
        self._jieba = _jieba()

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> CpmTokenizer:
        """Load the tokenizer file that a model or artifact directory carries."""
        found = find_tokenizer_file(directory)
        if found is None:
            names = " or ".join(TOKENIZER_FILENAMES)
            raise TokenizerError(f"no tokenizer file ({names}) in {directory}; pass one with --tokenizer")
        return cls(found)

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eos_id(self) -> int:
        """End of document: CPM's only stop token (``<eod>``)."""
        return self.eod_id

    def _prepare(self, text: str) -> str:
        pieces = self._jieba.cut(clean(text, "text to tokenize"), cut_all=False)
        return " ".join(p.translate(_ENCODE_MAP) for p in pieces)

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(self._prepare(text))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # SentencePiece encodes a list in one native call; jieba has no batch API.
        prepared = [self._prepare(t) for t in texts]
        return self._sp.EncodeAsIds(prepared) if prepared else []

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._size):
            bad = next(i for i in ids if not 0 <= i < self._size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{self._size - 1}) of {self.path}")
        text = self._sp.DecodeIds(ids)
        return text.replace(" ", "").translate(_DECODE_MAP)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= int(token_id) < self._size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self._size - 1}) of {self.path}")
        return self._sp.IdToPiece(int(token_id))


def find_tokenizer_file(directory: str | os.PathLike[str]) -> Path | None:
    """The first CPM tokenizer file name present in ``directory``, or None."""
    for name in TOKENIZER_FILENAMES:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None
