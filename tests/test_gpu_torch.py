"""The torch paths on a CUDA GPU: eager generation, ``cpm bench --device cuda``, bf16 training.

Marked ``gpu`` and skipped (with the reason) where torch sees no CUDA device. Run them on a GPU
machine with ``pytest -m gpu``. As of this writing they have never run on a GPU (the project's
machines have none); their logic was checked by running them once with DEVICE set to "cpu".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# cuBLAS is deterministic only with a fixed workspace; it reads this when it starts, so set it before any
# test touches CUDA (the exact-resume test compares two runs' weights).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

torch = pytest.importorskip("torch")

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    ),
]

PROMPTS = ("滚滚长江东逝水", "话说天下大势，分久必合", "白发")


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """The tiny checkpoint on the CPU (the reference) and on DEVICE."""
    from cpm_infer.backends import load_backend

    cpu, tok = load_backend("torch", tiny_checkpoint, device="cpu")
    gpu, _ = load_backend("torch", tiny_checkpoint, device=DEVICE)
    assert next(gpu.model.parameters()).device.type == torch.device(DEVICE).type
    return cpu, gpu, tok


def _tokens(backend, tok, prompts, config):
    from cpm_infer.engine.generate import generate

    return [r.token_ids for r in generate(backend, [tok.encode(p) for p in prompts], config, tok)]


def test_greedy_on_the_gpu_matches_the_cpu(pair):
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import left_pad

    cpu, gpu, tok = pair
    ids, mask, pos = left_pad([tok.encode(p) for p in PROMPTS], pad_id=tok.pad_id)
    (a, _), (b, _) = gpu.prefill(ids, mask, pos), cpu.prefill(ids, mask, pos)
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)  # fp32 on both; torch's TF32 matmul default is off
    config = GenerationConfig(max_new_tokens=24, temperature=0.0, ban_unk=False, ignore_eos=True)
    assert _tokens(gpu, tok, PROMPTS, config) == _tokens(cpu, tok, PROMPTS, config)


def test_left_padded_batch_on_the_gpu_equals_each_prompt_alone(pair):
    from cpm_infer.config import GenerationConfig

    _, gpu, tok = pair
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, ban_unk=False, ignore_eos=True)
    batched = _tokens(gpu, tok, PROMPTS, config)
    alone = [_tokens(gpu, tok, [p], config)[0] for p in PROMPTS]
    assert batched == alone and len({len(tok.encode(p)) for p in PROMPTS}) == 3  # really padded


def test_seeded_sampling_on_the_gpu(pair):
    from cpm_infer.config import GenerationConfig

    cpu, gpu, tok = pair
    config = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=3, num_samples=2, ignore_eos=True)
    first = _tokens(gpu, tok, PROMPTS[:2], config)
    assert first == _tokens(gpu, tok, PROMPTS[:2], config)  # same seed, same tokens
    assert first == _tokens(cpu, tok, PROMPTS[:2], config)  # sampling is on the host: the device does not matter
    assert first[0] != first[1]  # the two samples of a prompt differ
    assert first != _tokens(gpu, tok, PROMPTS[:2], config.replace(seed=4))


def test_cpm_generate_on_the_gpu(monkeypatch, capsys, tiny_checkpoint):
    from conftest import run_cli

    args = ("generate", "-m", str(tiny_checkpoint), "-p", "话说天下", "-n", "12", "-t", "0")
    code, on_gpu, err = run_cli(monkeypatch, capsys, *args, "--device", DEVICE)
    assert code == 0, err
    code, on_cpu, err = run_cli(monkeypatch, capsys, *args, "--device", "cpu")
    assert code == 0, err
    assert on_gpu == on_cpu and on_gpu.strip()


def test_cpm_bench_on_the_gpu(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    from conftest import run_cli

    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "bench",
        "-m",
        str(tiny_checkpoint),
        "--backends",
        "hf,torch",
        "--device",
        DEVICE,
        "--batch",
        "1,8",
        "--new-tokens",
        "8",
        "--context",
        "",
        "--repeats",
        "2",
        "-o",
        str(out),
    )
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    rows = data["results"]
    assert {r["backend"] for r in rows} == {"hf-generate", "torch"} and not data["skipped"]
    assert {(r["backend"], r["batch"]) for r in rows} >= {(b, n) for b in ("hf-generate", "torch") for n in (1, 8)}
    for r in rows:
        assert r["decode_p50_ms"] > 0 and r["tokens_per_s"] > 0
        if DEVICE.startswith("cuda"):
            assert r["gpu_peak_mb"] and r["gpu_peak_mb"] > 0  # torch's allocator saw the model and cache
    assert "decode x" in stdout


# -- training --------------------------------------------------------------------------------------
@pytest.fixture()
def deterministic():
    """Deterministic kernels where torch has them, so two runs of the same steps give the same weights."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def _train(data: Path, out: Path, checkpoint: Path, *extra: str):
    from typer.testing import CliRunner

    from cpm_infer.cli.app import app

    args = [
        "train", "finetune", data, "-o", out, "-m", checkpoint, "--max-len", "32", "--batch-size", "4",
        "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--warmup-steps", "1", "--lr", "3e-3",
        "--val-fraction", "0.25", "--seed", "7", "--precision", "bf16", "--grad-checkpointing",
        "--cache-dir", out.parent / "cache", *extra,
    ]  # fmt: skip
    if not DEVICE.startswith("cuda"):
        args.append("--cpu")
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def test_bf16_training_with_checkpointing_on_the_gpu_resumes_exactly(
    monkeypatch, tmp_path, tiny_checkpoint, deterministic
):
    pytest.importorskip("accelerate", reason="training needs the train extra (accelerate)")
    from conftest import CORPUS
    from safetensors.torch import load_file

    import trainer.finetune
    from trainer.state import read_metrics

    data = tmp_path / "data.txt"
    data.write_text("\n".join(CORPUS.strip().splitlines() * 3) + "\n", encoding="utf-8")
    seen = []
    real_run = trainer.finetune.run

    def spy(model, *args, **kwargs):
        result = real_run(model, *args, **kwargs)
        seen.append((model, kwargs["accelerator"]))
        return result

    monkeypatch.setattr(trainer.finetune, "run", spy)
    _train(data, tmp_path / "straight" / "run", tiny_checkpoint)
    model, acc = seen[0]
    assert acc.device.type == torch.device(DEVICE).type and acc.mixed_precision == "bf16"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing

    split = tmp_path / "split" / "run"
    _train(data, split, tiny_checkpoint, "--stop-after-steps", "2")
    _train(data, split, tiny_checkpoint, "--resume")

    def losses(run: Path) -> dict[int, float]:
        return {int(r["step"]): float(r["loss"]) for r in read_metrics(run / "metrics.csv") if r["split"] == "train"}

    straight = losses(tmp_path / "straight" / "run")
    assert sorted(straight) == list(range(1, 7)) and all(np.isfinite(v) for v in straight.values())
    assert losses(split) == pytest.approx(straight, rel=1e-4)
    ours = load_file(str(split / "last" / "model.safetensors"))
    reference = load_file(str(tmp_path / "straight" / "run" / "last" / "model.safetensors"))
    for key, tensor in reference.items():
        assert (ours[key].float() - tensor.float()).abs().max() <= 1e-4, key
