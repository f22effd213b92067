"""``cpm batch``: bulk generation on Ray Data (many prompts, a pool of model actors, resumable output)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli.gen_options import GenOptions, generation_options
from cpm_infer.cli.options import (
    BackendOpt,
    DeviceOpt,
    DraftOpt,
    DraftTokensOpt,
    ModelOpt,
    RayAddressOpt,
    ThreadsOpt,
    TokenizerOpt,
    TruncateOpt,
)
from cpm_infer.settings import DRAFT_TOKENS


@generation_options("batch")
def batch(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Prompt files: text (a prompt per line), JSONL (prompt or title/context) or Parquet."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (a rerun resumes it).")],
    model: ModelOpt = None,
    output_format: Annotated[str, typer.Option("--format", help="Part files: jsonl or parquet.")] = "jsonl",
    actors: Annotated[int, typer.Option("--actors", min=1, help="Model replicas (Ray actors).")] = 1,
    actor_cpus: Annotated[float, typer.Option("--actor-cpus", min=0.01, help="CPUs each actor reserves.")] = 1.0,
    actor_gpus: Annotated[float, typer.Option("--actor-gpus", min=0, help="GPUs each actor reserves.")] = 0.0,
    part_size: Annotated[
        int, typer.Option("--part-size", min=1, help="Prompts per part file (what a rerun skips when done).")
    ] = 256,
    ray_address: RayAddressOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts generated together.")] = 8,
    gen: GenOptions = None,  # type: ignore[assignment]  # replaced by the generation options
    truncate: TruncateOpt = False,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = DRAFT_TOKENS,
) -> None:
    """Generate for every prompt of INPUTS on a Ray cluster; results as the same records as `cpm generate
    --output` (with the prompt's index) plus the seed, in part files under OUTPUT. Same seed, same results (and the
    same draft: with --draft, greedy output is unchanged and samples keep their distribution; it pays where one
    sequence runs at a time, --batch-size 1)."""
    from cpm_infer.backends import detect_backend
    from cpm_infer.cli._common import resolve_model
    from cpm_infer.cluster import connected, prefer_loopback
    from cpm_infer.deps import require

    prefer_loopback(ray_address)
    require("ray.data", "ray")
    from cpm_infer.bulk.job import BulkJob, describe_inputs, open_output
    from cpm_infer.bulk.pipeline import Pool, Progress, run

    config = gen.config()
    model_path = resolve_model(model)
    job = BulkJob(
        model=str(model_path),
        output=str(output),
        config=config,
        backend=detect_backend(model_path) if backend == "auto" else backend,
        device=device,
        tokenizer=str(tokenizer) if tokenizer else None,
        threads=threads,
        batch_size=batch_size,
        truncate=truncate,
        fmt=output_format,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    pool = Pool(actors=actors, cpus=actor_cpus, gpus=actor_gpus, prompts_per_part=part_size)
    open_output(job, describe_inputs(inputs))  # refuse a wrong output directory before starting Ray
    with connected(ray_address) as local, _ProgressBar() as bar:
        where = "a local Ray cluster" if local else f"the Ray cluster at {ray_address or 'RAY_ADDRESS'}"
        print(f"generating on {where} with {actors} actor(s) of {job.backend} ({model_path})", file=sys.stderr)
        result: Progress = run(job, inputs, pool, on_progress=bar.update)
    skipped = f"; {result.skipped} finished earlier" if result.skipped else ""
    rate = f", {result.done / result.elapsed_s:.2f} prompts/s" if result.elapsed_s > 0 else ""
    samples = config.num_samples * config.num_return_sequences
    print(
        f"wrote {result.done} prompt(s) x {samples} sample(s) to {output} in {result.parts} part(s) by "
        f"{len(result.workers)} actor(s){rate}{skipped}; {result.total} in all",
        file=sys.stderr,
    )


class _ProgressBar:
    """Prompts done out of those left to do, on stderr."""

    def __enter__(self) -> _ProgressBar:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("prompts"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = None
        self.progress.start()
        return self

    def update(self, state: object) -> None:
        from cpm_infer.bulk.pipeline import Progress

        assert isinstance(state, Progress)
        rate = f"{state.done / state.elapsed_s:.2f}/s" if state.elapsed_s > 0 else ""
        if self.task is None:
            self.task = self.progress.add_task("generate", total=state.todo, rate=rate)
        self.progress.update(self.task, completed=state.done, rate=rate)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
