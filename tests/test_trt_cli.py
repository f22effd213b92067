"""`cpm export trt` argument errors and help (no TensorRT needed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import run_cli as run

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_help_lists_the_options_without_importing_runtimes():
    code = (
        "import sys; sys.argv=['cpm','export','trt','--help']\n"
        "from cpm_infer.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit: pass\n"
        "print('HEAVY', [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'cuda') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for flag in (
        "--precision",
        "--max-batch",
        "--max-input",
        "--max-total",
        "--workspace-gb",
        "--timing-cache",
        "--force",
        "--device",
    ):
        assert flag in out


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


def export_trt(monkeypatch, capsys, source, out, *extra: str) -> tuple[int, str, str]:
    """``cpm export trt SOURCE OUT`` for small engine limits (prompts of 16 tokens, 64 in all), then ``extra``."""
    return run(
        monkeypatch, capsys, "export", "trt", str(source), str(out), "--max-input", "16", "--max-total", "64", *extra
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--precision", "int8"), "error: --precision must be one of auto, fp16, fp32, got 'int8'"),
        (("--max-input", "64", "--max-total", "64"), "error: --max-total 64 must exceed --max-input 64"),
        (("--max-total", "4096"), "error: --max-total 4096 exceeds the model's context of 128 positions"),
        (("--workspace-gb", "0"), "error: --workspace-gb must be positive"),
    ],
)
def test_argument_errors_are_one_line(monkeypatch, capsys, onnx_dir, tmp_path, extra, message):
    code, _, err = export_trt(monkeypatch, capsys, onnx_dir, tmp_path / "engine", *extra)
    assert code == 1
    assert err.strip().splitlines()[-1] == message or err.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "engine").exists()


def test_existing_out_dir_and_missing_source(monkeypatch, capsys, onnx_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, err = export_trt(monkeypatch, capsys, onnx_dir, tmp_path / "taken")
    assert code == 1 and "exists; pass --force to replace it" in err
    code, _, err = run(monkeypatch, capsys, "export", "trt", str(tmp_path / "nothing"), str(tmp_path / "e"))
    assert code == 1 and "is not an exported artifact" in err


def test_typer_range_checks(monkeypatch, capsys, onnx_dir, tmp_path):
    code, _, err = run(monkeypatch, capsys, "export", "trt", str(onnx_dir), str(tmp_path / "e"), "--max-batch", "0")
    assert code == 2 and "--max-batch" in err


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is missing")
def test_valid_request_without_tensorrt_names_the_extra(monkeypatch, capsys, onnx_dir, tmp_path):
    code, _, err = export_trt(monkeypatch, capsys, onnx_dir, tmp_path / "engine")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: tensorrt is not available") and "pip install 'cpm-infer[tensorrt]'" in last
    assert not (tmp_path / "engine").exists()
