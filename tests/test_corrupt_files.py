"""Corrupt and mismatched files, each a one-line error naming the file; a full disk leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import make_tiny_model, run_cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _torch_bin(directory: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    _truncate(directory / "pytorch_model.bin")


# name -> (source "checkpoint" | "artifact", how to break the copy, the file the error must name, message)
BREAKAGES = {
    "truncated model.onnx": ("artifact", lambda d: _truncate(d / "model.onnx"), "model.onnx", "cannot load"),
    "truncated model.safetensors": (
        "checkpoint",
        lambda d: _truncate(d / "model.safetensors"),
        "model.safetensors",
        "cannot read weights",
    ),
    "truncated pytorch_model.bin": ("checkpoint", _torch_bin, "pytorch_model.bin", "cannot read weights"),
    "manifest: layers edited": (
        "artifact",
        lambda d: _edit_json(d / "manifest.json", lambda m: m["spec"].update(n_layer=3)),
        "manifest.json",
        "KV contract for 3 layers",
    ),
    "manifest: heads edited": (
        "artifact",
        lambda d: _edit_json(d / "manifest.json", lambda m: m["spec"].update(n_head=2)),
        "tiny",
        "",
    ),
    "manifest: cut short": (
        "artifact",
        lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:-30]),
        "manifest.json",
        "cannot read",
    ),
    "manifest: graph file renamed": (
        "artifact",
        lambda d: _edit_json(d / "manifest.json", lambda m: m["graph_files"].update(model="nope.onnx")),
        "manifest.json",
        "nope.onnx, which is missing",
    ),
    "config.json: layers a string": (
        "checkpoint",
        lambda d: _edit_json(d / "config.json", lambda c: c.update(n_layer="two")),
        "config.json",
        "n_layer",
    ),
    "config.json: hidden a list": (
        "checkpoint",
        lambda d: _edit_json(d / "config.json", lambda c: c.update(n_embd=[32])),
        "config.json",
        "",
    ),
    "config.json: vocab null": (
        "checkpoint",
        lambda d: _edit_json(d / "config.json", lambda c: c.update(vocab_size=None)),
        "config.json",
        "",
    ),
    "config.json: not an object": (
        "checkpoint",
        lambda d: (d / "config.json").write_text("[1, 2]"),
        "config.json",
        "JSON object",
    ),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_corrupt_files_are_one_line_errors_naming_the_file(
    monkeypatch, capsys, tmp_path, tiny_checkpoint, artifact, name
) -> None:
    source, breakage, named, message = BREAKAGES[name]
    broken = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint if source == "checkpoint" else artifact, broken)
    breakage(broken)
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(broken), "-p", "话说", "-n", "2")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err and message in err and "unexpected" not in err, err


def test_a_tokenizer_of_another_model_is_refused(monkeypatch, capsys, tmp_path, tiny_vocab) -> None:
    """Both ways: more pieces than the embedding has rows, or far fewer (another model's ids)."""
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    big = make_tiny_model(tok.vocab_size + 500, eod_id=tok.eod_id, pad_id=tok.pad_id)
    model = save_checkpoint(big, tiny_vocab, tmp_path / "big")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(model), "-p", "话说")
    assert code == 1 and "wrong tokenizer" in err and str(model / "spiece.model") in err and err.count("\n") == 1
    small = save_checkpoint(make_tiny_model(tok.vocab_size - 20), tiny_vocab, tmp_path / "small")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(small), "-p", "话说")
    assert code == 1 and f"has {tok.vocab_size} pieces but the model at {small} embeds" in err


def test_results_file_cut_back_when_the_disk_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write failing part-way (ENOSPC) leaves the JSONL as it was before the batch."""
    from cpm_infer import jobs

    path = tmp_path / "out.jsonl"
    results, _ = jobs.ResultsFile.open(path, [{"prompt": "a"}, {"prompt": "b"}], 1, resume=False)
    results.write([{"index": 0, "prompt": "a", "sample": 0, "text": "x"}])
    before = path.read_bytes()
    real_write = os.write

    def short_then_full(fd: int, data) -> int:
        if len(data) > 8:
            return real_write(fd, bytes(data[:8]))  # the kernel wrote part of it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs.os, "write", short_then_full)
    with pytest.raises(jobs.JobError, match="No space left on device"):
        results.write([{"index": 1, "prompt": "b", "sample": 0, "text": "y" * 50}])
    results.close()
    assert path.read_bytes() == before


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root and mount privileges needed; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_export_onto_a_full_disk_leaves_nothing(monkeypatch, capsys, small_disk, tiny_checkpoint) -> None:
    out = small_disk / "onnx"
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", str(tiny_checkpoint), str(out))
    last = err.strip().splitlines()[-1]  # after the progress lines
    assert code == 1 and "Traceback" not in err
    assert last == f"error: no space left on the device while writing {out}: nothing was written"
    assert list(small_disk.iterdir()) == []


def test_generate_onto_a_full_disk_keeps_whole_lines(
    monkeypatch, capsys, small_disk, tiny_checkpoint, tmp_path
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (256 * 1024 - 6 * 1024))  # about 6 KiB left (tmpfs rounds to pages)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["话说天下大势"] * 40) + "\n", encoding="utf-8")
    out = small_disk / "out.jsonl"
    args = ("generate", "-m", str(tiny_checkpoint), "-i", str(prompts), "-n", "40", "--batch-size", "4")
    code, _, err = run_cli(monkeypatch, capsys, *args, "-o", str(out), "--ignore-eos")
    assert code == 1 and f"cannot write {out}: No space left on device" in err and err.count("\n") == 1
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines and all(line.endswith("\n") and json.loads(line)["index"] >= 0 for line in lines)
    assert len(lines) % 4 == 0  # whole batches only
