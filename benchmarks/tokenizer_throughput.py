"""Throughput of the exact CPM tokenizer (texts/s and characters/s) on the golden file.

python benchmarks/tokenizer_throughput.py [--vocab-dir ../shared/cpm-vocab] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from cpm_infer.tokenizer import CpmTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vocab-dir", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "cpm-vocab"
    )
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tok = CpmTokenizer(args.vocab_dir / "chinese_vocab.model")
    texts = [
        json.loads(line)["text"]
        for line in (args.vocab_dir / "golden-public.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    tok.encode_batch(texts)  # warm-up: jieba loads its dictionary on first use
    corpus = texts * args.repeat
    chars = sum(map(len, corpus))
    for name, run in (
        ("encode (one by one)", lambda: [tok.encode(t) for t in corpus]),
        ("encode_batch", lambda: tok.encode_batch(corpus)),
    ):
        start = time.perf_counter()
        ids = run()
        elapsed = time.perf_counter() - start
        print(
            f"{name:20s} {len(corpus) / elapsed:8.0f} texts/s {chars / elapsed / 1e6:6.2f} M chars/s  "
            f"({len(corpus)} texts, {sum(map(len, ids))} tokens)"
        )
    start = time.perf_counter()
    tok.decode_batch(tok.encode_batch(corpus))
    print(f"{'encode+decode':20s} {len(corpus) / (time.perf_counter() - start):8.0f} texts/s")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
