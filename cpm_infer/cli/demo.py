"""``cpm demo``: the quickstart's main job on the bundled demo model: export it to ONNX (validated),
generate a sample with ONNX Runtime, and measure it against eager PyTorch in the same process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cpm_infer.cli.options import ModelOpt, ThreadsOpt

DEFAULT_PROMPT = "却说曹操引兵"


OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Where the ONNX artifact and bench report go.")]


def demo(
    model: ModelOpt = None,
    out: OutOpt = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = DEFAULT_PROMPT,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 80,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    threads: ThreadsOpt = None,
) -> None:
    """Export, generate, and compare with eager PyTorch, in one command."""
    from rich.console import Console

    from cpm_infer.cli._common import resolve_model

    console, status = Console(), Console(stderr=True)
    model_path = resolve_model(model)
    out_dir = out or Path.home() / ".cache" / "cpm-infer" / "demo"
    artifact = out_dir / "onnx"
    _export(model_path, artifact, threads, status)
    _sample(artifact, prompt, max_new_tokens, seed, threads, console)
    _compare(model_path, artifact, out_dir, threads, console, status)


def _export(model_path: Path, artifact: Path, threads: int | None, status: Any) -> None:
    """1. export, validated against eager PyTorch (reused when an earlier run exported these exact weights)."""
    from cpm_infer.artifact import ManifestError, read_manifest
    from cpm_infer.checkpoint import open_checkpoint
    from export.onnx_export import export_onnx

    try:
        reusable = read_manifest(artifact).source_sha256 == open_checkpoint(model_path).weights_sha256()
    except ManifestError:
        reusable = False
    if reusable:
        status.print(f"[dim]reusing the ONNX artifact in {artifact}[/dim]")
        return
    with status.status("exporting to ONNX and validating against eager PyTorch") as spinner:
        result = export_onnx(
            model_path, artifact, force=True, threads=threads, progress=lambda m: spinner.update(f"export: {m}")
        )
    # graph checks carry a present key/value diff too, backend checks only logits
    diffs = [d for r in result.reports for c in r.checks for d in (c.logits_diff, c.present_diff) if d is not None]
    status.print(f"exported {artifact} (validated: max |diff| {max(diffs, default=0.0):.1e} vs eager PyTorch)")


def _sample(artifact: Path, prompt: str, max_new_tokens: int, seed: int, threads: int | None, console: Any) -> None:
    """2. generate with ONNX Runtime (no torch involved), streaming."""
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    backend, tok = load_backend("ort", artifact, threads=threads)
    try:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=seed
        )
        console.print(f"\n[bold]{prompt}[/bold]", end="")
        generate(
            backend, [tok.encode(prompt)], config, tok, callback=lambda _, t: console.print(t, end="", highlight=False)
        )
        console.print("\n")
    finally:
        backend.close()


def _compare(model_path: Path, artifact: Path, out_dir: Path, threads: int | None, console: Any, status: Any) -> None:
    """3. the same model, eager vs ONNX Runtime, same inputs, one process."""
    from cpm_infer.bench import harness, report, setup

    prepared = setup.prepare(
        model=model_path,
        preset_name=None,
        tokenizer_file=None,
        backends=["hf", "torch", "ort"],
        onnx_dirs=[artifact],
        trt_dirs=[],
        device="cpu",
        threads=threads,
        say=lambda m: None,
    )
    try:
        (case,) = harness.build_cases(
            batches=[1], prompt_lens=[16], new_tokens=[32], contexts=[], n_positions=prepared.spec.n_positions
        )
        prompts = harness.make_prompts(case, prepared.spec.vocab_size)
        with status.status("benchmarking eager PyTorch vs ONNX Runtime"):
            results = [harness.measure(runner, case, prompts, repeats=3) for runner in prepared.runners]
        written = report.write_reports(
            results, out_dir / "bench", command="cpm demo", env=report.environment(), skipped=prepared.skipped
        )
    finally:
        prepared.close()
    console.print(report.terminal_table(written["rows"], compact=True, width=console.width))
    by_name = {r["backend"]: r for r in written["rows"]}
    if "ort" in by_name and by_name["ort"]["decode_speedup"]:
        speedup = by_name["ort"]["decode_speedup"]
        console.print(f"ONNX Runtime decodes {speedup:.1f}x faster than transformers' generate() here.")
    status.print(f"[dim]report: {out_dir / 'bench' / 'bench.md'}[/dim]")
