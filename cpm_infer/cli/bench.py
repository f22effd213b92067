"""``cpm bench``: latency of every available backend against eager PyTorch, in one process, same inputs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cpm_infer.cli.options import DeviceOpt, DraftOpt, DraftTokensOpt, ThreadsOpt, TokenizerOpt
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS, for_door


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CpmError(f"{flag} takes comma-separated integers, got {text!r}") from exc
    if not values:
        raise CpmError(f"{flag} needs at least one value")
    return values


_SAMPLING_HELP = (
    "greedy, default (the CLI's: temperature 1.0, top_p 0.9) or key=value,... settings ("
    + ", ".join(s.name for s in for_door("bench"))
    + "). Repeat to compare. [default: greedy]"
)
BenchModelOpt = Annotated[Path | None, typer.Option("--model", "-m", help="Checkpoint directory to benchmark.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="small, medium or large with random weights.")]
OnnxOpt = Annotated[
    list[Path] | None, typer.Option("--onnx", help="ONNX artifact(s) of --model (default: export one).")
]
TrtOpt = Annotated[list[Path] | None, typer.Option("--trt", help="TensorRT engine artifact(s).")]
BackendsOpt = Annotated[
    str, typer.Option("--backends", help="Comma-separated: hf (transformers generate), torch, ort, trt.")
]
BatchOpt = Annotated[str, typer.Option("--batch", help="Batch sizes; the first is the base case.")]
PromptLenOpt = Annotated[str, typer.Option("--prompt-len", help="Prompt lengths; the first is the base case.")]
NewTokensOpt = Annotated[str, typer.Option("--new-tokens", help="New tokens; the first is the base case.")]
ContextOpt = Annotated[
    str, typer.Option("--context", help="Context lengths for decode latency vs context ('' = none).")
]
RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per case (after one warm-up).")]
SamplingOpt = Annotated[list[str] | None, typer.Option("--sampling", help=_SAMPLING_HELP)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for bench.json, bench.md and plots.")]


def bench(
    model: BenchModelOpt = None,
    preset: PresetOpt = None,
    onnx: OnnxOpt = None,
    trt: TrtOpt = None,
    backends: BackendsOpt = "hf,torch,ort,trt",
    batch: BatchOpt = "1",
    prompt_len: PromptLenOpt = "16",
    new_tokens: NewTokensOpt = "64",
    context: ContextOpt = "16,256,900",
    repeats: RepeatsOpt = 3,
    sampling: SamplingOpt = None,
    out: OutOpt = Path("bench-results"),
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = DRAFT_TOKENS,
) -> None:
    """Benchmark backends side by side: first-token latency, decode ms/step (p50/p90), tokens/s, memory. With
    --draft, each torch/ort runner also runs with the draft (accepted share, tokens per target pass)."""
    from rich.console import Console

    from cpm_infer.bench import harness, report
    from cpm_infer.bench import setup as bench_setup
    from cpm_infer.bench.runners import parse_sampling

    console = Console(stderr=True)
    modes = list({m.label: m for m in (parse_sampling(text) for text in sampling or ["greedy"])}.values())
    cases_args = dict(
        batches=_ints(batch, "--batch"),
        prompt_lens=_ints(prompt_len, "--prompt-len"),
        new_tokens=_ints(new_tokens, "--new-tokens"),
        contexts=_ints(context, "--context") if context.strip() else [],
    )
    prepared = bench_setup.prepare(
        model=model,
        preset_name=preset,
        tokenizer_file=tokenizer,
        backends=[b.strip() for b in backends.split(",") if b.strip()],
        onnx_dirs=onnx or [],
        trt_dirs=trt or [],
        device=device,
        threads=threads,
        say=lambda m: console.print(f"[dim]{m}[/dim]"),
        check_spec=lambda spec: harness.build_cases(**cases_args, n_positions=spec.n_positions),
        draft=draft,
        draft_tokens=draft_tokens,
    )
    try:
        for name, reason in prepared.skipped.items():
            console.print(f"[yellow]skipped {name}:[/yellow] {reason}")
        for name, seconds in prepared.load_s.items():
            console.print(f"loaded {name} in {seconds:.1f} s")
        cases = harness.build_cases(**cases_args, n_positions=prepared.spec.n_positions)
        results = _measure_all(prepared, cases, modes, repeats, console)
        source = (preset and f"preset {preset} (random weights)") or str(model)
        env = report.environment(
            {
                "device": device,
                "devices": prepared.devices,
                "threads": threads,
                "spec": prepared.spec.to_dict(),
                "source": source,
                "load_s": prepared.load_s,
                "sampling": {mode.label: mode.describe() for mode in modes},
            }
        )
        command = "cpm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        written = report.write_reports(results, out, command=command, env=env, skipped=prepared.skipped)
    finally:
        prepared.close()
    out_console = Console()
    out_console.print(report.terminal_table(written["rows"], width=out_console.width))
    console.print("wrote " + ", ".join(str(p) for p in written["files"]))


def _measure_all(prepared: Any, cases: list, modes: list, repeats: int, console: Any) -> list:
    """Every case x runner x sampling mode, with a progress bar; a runner that cannot sample so is skipped."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cpm_infer.bench import harness

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    results = []
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * len(prepared.runners) * len(modes))
        for case in cases:
            prompts = harness.make_prompts(case, prepared.spec.vocab_size)
            for base_runner in prepared.runners:
                for mode in modes:
                    runner = base_runner.with_sampling(mode)
                    progress.advance(task)
                    if runner is None:
                        prepared.skipped[f"{base_runner.name} ({mode.label})"] = "not supported by this runner"
                        continue
                    where = f"{case.sweep} b{case.batch} p{case.prompt_len} n{case.new_tokens}"
                    progress.update(task, description=f"{runner.name} {mode.label}: {where}")
                    peak = prepared.gpu_peaks.get(runner.name)
                    results.append(harness.measure(runner, case, prompts, repeats=repeats, gpu_peak=peak))
    return results
