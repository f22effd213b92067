"""A scraped-style data folder and what the data reader (``cpm train``, ``cpm eval``) makes of it.

The folder holds one file per document in the CPM seeds' format, with what scrapers leave behind
mixed in at fixed rates: empty titles, titles without a body, blank files, UTF-8 BOMs, CRLF line
ends, ``标题:`` with an ASCII colon, extra header fields, GBK-encoded files, invalid UTF-8 bytes,
unclosed headers and binary junk. The texts are the demo model's held-out chapter (public domain,
bundled), cut into sentences, plus the texts of the real vocabulary's golden file where it is present.
Every file's fate is known when it is written, so ``--check`` compares the reader's summary with it.

    python benchmarks/wild_data.py --out /tmp/wild --check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "cpm_infer" / "demo" / "sanguo" / "heldout.txt"
GOLDEN = Path(os.environ.get("CPM_VOCAB_DIR", ROOT.parent / "shared" / "cpm-vocab")) / "golden-public.jsonl"

# case -> (weight, what the reader should do: "kept" or the skip reason)
CASES = {
    "clean": (30, "kept"),
    "empty title": (6, "kept"),
    "title without body": (5, "title without body"),
    "blank file": (4, "empty file"),
    "utf-8 bom": (6, "kept"),
    "crlf": (6, "kept"),
    "ascii colon": (6, "kept"),
    "extra header fields": (6, "kept"),
    "gbk": (8, "kept"),
    "invalid utf-8 byte": (4, "kept"),
    "unclosed header": (3, "malformed header"),
    "binary junk": (4, "binary file"),
}


def texts() -> list[str]:
    """Sentences of the held-out chapter (2-4 to a document), and the golden file's texts if present."""
    sentences = [s + "。" for line in HELDOUT.read_text(encoding="utf-8").splitlines() for s in line.split("。") if s]
    out = ["".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    if GOLDEN.is_file():
        golden = [json.loads(line)["text"] for line in GOLDEN.read_text(encoding="utf-8").splitlines()]
        out += [t for t in golden if len(t.strip()) >= 4]
    return out


def write_folder(out: Path, seed: int = 0) -> Counter:
    """Write the folder; returns the expected outcome counts (``kept``, skip reasons, ``gb18030``, ``replaced``)."""
    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    names, weights = zip(*((k, w) for k, (w, _) in CASES.items()), strict=True)
    expected: Counter = Counter()
    for i, body in enumerate(texts()):
        case = rng.choices(names, weights)[0]
        title = f"第{i}篇 {''.join(body.split())[:6]}"
        if case == "gbk":
            try:
                body.encode("gbk")
            except UnicodeEncodeError:
                case = "clean"
        header = {"标题": title, "日期": f"2021-03-{i % 28 + 1:02d}", "作者": "佚名"}
        sep = "："
        if case == "empty title":
            header["标题"] = ""
        elif case == "ascii colon":
            sep = ":"
        elif case == "extra header fields":
            header |= {"来源": "https://example.invalid/essay", "tags": "三国, 演义"}
        lines = ["---", *(f"{k}{sep}{v}" for k, v in header.items()), "---", ""]
        if case == "unclosed header":
            lines = lines[:-2]
        text = "\n".join(lines) + ("" if case == "title without body" else "\n" + body + "\n")
        data = text.encode("utf-8")
        if case == "blank file":
            data = b"" if i % 2 else b"\n \n"
        elif case == "utf-8 bom":
            data = b"\xef\xbb\xbf" + data
        elif case == "crlf":
            data = text.replace("\n", "\r\n").encode("utf-8")
        elif case == "gbk":
            data = text.encode("gbk")
            expected["gb18030"] += 1
        elif case == "invalid utf-8 byte":
            data += b"\xff\xfe trailing bytes of a cut download\n"
            expected["replaced"] += 1
        elif case == "binary junk":
            data = bytes(rng.randrange(256) for _ in range(512)) + b"\x00"
        (out / f"essay{i:04d}.txt").write_bytes(data)
        expected[CASES[case][1]] += 1
        expected[f"case: {case}"] += 1
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 unless the reader's counts are the expected")
    args = parser.parse_args()
    from cpm_infer.documents import read_documents

    expected = write_folder(args.out, args.seed)
    _, summary = read_documents([args.out])
    print(f"{sum(v for k, v in expected.items() if k.startswith('case: '))} files written to {args.out}:")
    for key in sorted(k for k in expected if k.startswith("case: ")):
        print(f"  {key[6:]:<22} {expected[key]}")
    print(f"reader: {summary.describe()}")
    got = Counter({"kept": summary.kept, **summary.skipped})
    got["gb18030"] = summary.encodings.get("gb18030", 0)
    got["replaced"] = len(summary.replaced)
    want = Counter({k: v for k, v in expected.items() if not k.startswith("case: ")})
    if args.check and got != want:
        print(f"MISMATCH: expected {dict(want)}, got {dict(got)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
