"""Train a SentencePiece model with CPM's pre-processing and special-piece layout.

CPM's vocabulary (chinese_vocab.model) was trained on jieba-cut text where each word's spaces
became U+2582 and newlines U+2583, words joined by a space; ``cpm_infer.tokenizer.CpmTokenizer``
applies the same transform before encoding. Its layout, which this reproduces: unigram model,
``<unk>`` id 0, ``<s>``/``</s>`` 1-2, control pieces ``<sep>`` ``<pad>`` ``<mask>``, and ``<eod>``
as an ordinary piece (user-defined here, so it always exists), with ``▂``/``▃`` in the vocabulary.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from trainer.errors import DataError, TrainError
from trainer.formats import Document, read_documents

log = logging.getLogger(__name__)

SPACE, NEWLINE = "\u2582", "\u2583"
CONTROL = ["<sep>", "<pad>", "<mask>"]
USER_DEFINED = ["<eod>", SPACE, NEWLINE]
_ENCODE_MAP = str.maketrans({" ": SPACE, "\n": NEWLINE})


def cpm_pretokenize(text: str) -> str:
    """CPM's pre-processing: jieba cut, space -> ▂ and newline -> ▃ in each word, words joined by ' '."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return " ".join(word.translate(_ENCODE_MAP) for word in jieba.cut(text, cut_all=False))


def corpus_lines(texts: Iterable[str]) -> Iterable[str]:
    """One SentencePiece sentence per text line (pre-tokenized); newlines are represented by ▃
    through the user-defined piece, so lines need not carry them."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield cpm_pretokenize(line.strip())


def train_tokenizer(
    data: Iterable[str | os.PathLike[str]],
    out_file: str | os.PathLike[str],
    *,
    vocab_size: int = 8000,
    data_format: str = "auto",
    character_coverage: float = 0.9995,
    model_type: str = "unigram",
    seed_sentencepiece_size: int = 1_000_000,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train on the documents of ``data`` (any trainer format; titles included) and write
    ``out_file`` (a ``.model`` file that CpmTokenizer loads)."""
    import sentencepiece as spm

    if vocab_size < 16:
        raise TrainError(f"vocab size must be >= 16, got {vocab_size}")
    if model_type not in ("unigram", "bpe"):
        raise TrainError(f"model type must be unigram or bpe, got {model_type!r}")
    docs = read_documents(data, data_format)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cpm-spm-") as tmp:
        corpus = _write_corpus(docs, Path(tmp) / "segments.txt", progress)
        prefix = Path(tmp) / "spm"
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                control_symbols=CONTROL,
                user_defined_symbols=USER_DEFINED,
                max_sentence_length=16384,
                seed_sentencepiece_size=seed_sentencepiece_size,
                shuffle_input_sentence=True,
                hard_vocab_limit=True,
                num_threads=max(1, min(os.cpu_count() or 1, 16)),
                minloglevel=2,
            )
        except RuntimeError as exc:
            # e.g. "Vocabulary size is too high (8000). Please set it to a value <= 1234."
            detail = re.sub(r"^(INTERNAL: )?\S+\(\d+\) \[.*?\] ", "", str(exc).strip().splitlines()[-1])
            raise TrainError(f"SentencePiece training failed: {detail}") from exc
        tmp_out = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.copyfile(prefix.with_suffix(".model"), tmp_out)
        os.replace(tmp_out, out)
    log.info("wrote a %d-piece CPM-style SentencePiece model to %s", vocab_size, out)
    return out


def _write_corpus(docs: list[Document], corpus: Path, progress: Callable[[int, int], None] | None) -> Path:
    """SentencePiece's input: the documents' titles and bodies, one pre-tokenized line a sentence."""
    with corpus.open("w", encoding="utf-8") as handle:
        for i, doc in enumerate(docs):
            for line in corpus_lines([doc.title or "", doc.content]):
                handle.write(line + "\n")
            if progress is not None:
                progress(i + 1, len(docs))
    if corpus.stat().st_size == 0:
        raise DataError("the data holds no text to train a tokenizer on")
    return corpus
