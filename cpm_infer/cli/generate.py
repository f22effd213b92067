"""``cpm generate``: text from a prompt, a title + context, or a file of prompts.

parse (the requests and the config) -> prepare (the backend and the prompts' ids) -> run (the engine, up to
``--batch-size`` prompts at once) -> write (stdout, a stream, or a resumable JSONL file).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cpm_infer.cli.gen_options import GenOptions, generation_options
from cpm_infer.cli.options import (
    BackendOpt,
    DeviceOpt,
    DraftOpt,
    DraftTokensOpt,
    ModelOpt,
    ThreadsOpt,
    TokenizerOpt,
    TruncateOpt,
)
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS

PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="Plain prompt text.")]
TitleOpt = Annotated[str | None, typer.Option("--title", help="Essay title: the prompt is `title <sep> context`.")]
ContextOpt = Annotated[str, typer.Option("--context", help="Text after the title (with --title).")]
InputOpt = Annotated[
    Path | None,
    typer.Option("--input", "-i", help="Prompts, one per line; or JSONL with prompt or title/context per line."),
]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write results as JSONL here.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Keep the results already in --output; generate only the prompts left.")
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Prompts in the running batch (the next joins as one finishes).")
]
StreamOpt = Annotated[bool, typer.Option("--stream", help="Print text as it is generated.")]


@generation_options("generate")
def generate(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    title: TitleOpt = None,
    context: ContextOpt = "",
    input_file: InputOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    batch_size: BatchSizeOpt = 8,
    gen: GenOptions = None,  # type: ignore[assignment]  # replaced by the generation options
    truncate: TruncateOpt = False,
    stream: StreamOpt = False,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = DRAFT_TOKENS,
) -> None:
    """Generate text with a CPM model (checkpoint or exported artifact)."""
    from cpm_infer.backends import load_backend
    from cpm_infer.cli._common import resolve_model

    job = _parse(prompt, title, context, input_file, output, resume, stream, gen)
    if draft is not None and job.config.beam_search:
        raise CpmError("--draft speeds up sampling and greedy decoding, not beam search; drop --draft or --num-beams")
    runtime, tok = load_backend(backend, resolve_model(model), device=device, tokenizer_file=tokenizer, threads=threads)
    try:
        job.draft = _open_draft(draft, runtime, tok, device, threads)
        job.draft_tokens = draft_tokens
        prompts = _prepare(job, runtime, tok, truncate)
        _run(job, runtime, tok, prompts, batch_size)
        _report_speculation(job)
    finally:
        if job.draft is not None:
            job.draft.close()
        runtime.close()  # free the runtime's memory now (GPU buffers), not at garbage collection


def _open_draft(draft: str | None, runtime: Any, tok: Any, device: str, threads: int | None) -> Any:
    if draft is None:
        return None
    from cpm_infer.engine.speculative import NGRAM, open_draft

    return open_draft(draft if draft == NGRAM else Path(draft), runtime, tok, device=device, threads=threads)


def _report_speculation(job: _Job) -> None:
    stats = job.speculation
    if stats is None:
        return
    if not stats.passes:
        print("speculation: no verify pass (it runs while one sequence runs: --batch-size 1)", file=sys.stderr)
        return
    print(
        f"speculation: {stats.passes} verify passes, {stats.accepted} of {stats.proposed} proposed tokens accepted "
        f"({stats.acceptance:.0%}), {stats.tokens_per_pass:.2f} tokens per pass",
        file=sys.stderr,
    )


@dataclass
class _Job:
    requests: list[dict]
    config: Any  # GenerationConfig
    output: Path | None
    resume: bool
    stream: bool
    draft: Any = None  # a speculative decoding draft (cpm_infer.engine.speculative)
    draft_tokens: int = DRAFT_TOKENS
    speculation: Any = None  # its SpeculationStats over the whole run

    @property
    def per_prompt(self) -> int:
        return self.config.num_samples * self.config.num_return_sequences


def _parse(
    prompt: str | None,
    title: str | None,
    context: str,
    input_file: Path | None,
    output: Path | None,
    resume: bool,
    stream: bool,
    gen: GenOptions,
) -> _Job:
    """The requests and the config, or a one-line error for a combination that cannot run."""
    from cpm_infer.jobs import read_requests

    if sum(x is not None for x in (prompt, title, input_file)) != 1:
        raise CpmError("give exactly one of --prompt, --title (with --context) or --input")
    if resume and output is None:
        raise CpmError("--resume continues an --output file; give --output")
    config = gen.config()
    if config.beam_search and stream:
        raise CpmError("--stream cannot show beam search (beams change until the end); drop --stream")
    if input_file is not None:
        requests = read_requests(input_file)
    elif prompt is not None:
        requests = [{"prompt": prompt}]
    else:
        requests = [{"title": title, "context": context}]
    return _Job(requests, config, output, resume, stream)


def _prepare(job: _Job, runtime: Any, tok: Any, truncate: bool) -> list[list[int]]:
    """Every prompt's ids, fitted to what this backend prefills (``cpm_infer.prompts``)."""
    from cpm_infer.prompts import PromptLimits, prepare

    limits, many = PromptLimits.of(runtime), len(job.requests) > 1
    where = {"prompt": "--prompt", "title": "--title"}
    return [
        prepare(
            tok,
            request,
            limits,
            max_new_tokens=job.config.max_new_tokens,
            truncate=truncate,
            which=f"prompt {i}" if many else where["title" if "title" in request else "prompt"],
        ).ids
        for i, request in enumerate(job.requests)
    ]


def _run(job: _Job, runtime: Any, tok: Any, prompts: list[list[int]], batch_size: int) -> None:
    """Generate every prompt not yet in the output (``--resume``) and write each as soon as it is done."""
    from cpm_infer.errors import Interrupted
    from cpm_infer.jobs import ResultsFile, pending_runs

    out, already = (None, set())
    if job.output:
        out, already = ResultsFile.open(job.output, job.requests, job.per_prompt, job.resume)
    if already:
        print(f"resuming: {len(already)} of {len(job.requests)} prompts already in {job.output}", file=sys.stderr)
    done = len(already)
    try:
        # Rows are seeded by prompt index and do not depend on their batch: every run of consecutive
        # pending prompts goes through the engine at once, up to --batch-size prompts running together.
        for run in pending_runs(len(job.requests), len(job.requests), already):
            chunk = prompts[run.start : run.start + run.count]
            for results, printer in _result_groups(runtime, chunk, job, tok, batch_size, run.start):
                _write(job, out, results, printer)
                done += 1
    except KeyboardInterrupt as exc:
        kept = f"; {done} of {len(job.requests)} prompts written to {job.output} (finish with --resume)"
        raise Interrupted(f"interrupted{kept if job.output else ''}") from exc
    finally:
        if out:
            out.close()
    if job.output:
        print(f"wrote {done} prompt(s) x {job.per_prompt} sample(s) to {job.output}", file=sys.stderr)


def _write(job: _Job, out: Any, results: list, printer: _StreamPrinter | None) -> None:
    """One prompt's results: to the output file (one write: a kill never leaves half its samples), as JSON
    lines (with logprobs), or as text."""
    from cpm_infer.jobs import result_record

    records = [result_record(job.requests[r.prompt_index], r) for r in results]
    if out:
        out.write(records)
    elif job.config.logprobs is not None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    elif not job.stream:
        for record in records:
            _print_result(record, len(job.requests) > 1 or job.per_prompt > 1)
    if printer is not None:
        printer.close()


def _result_groups(
    runtime: Any, prompts: list[list[int]], job: _Job, tok: Any, batch_size: int, offset: int
) -> Iterator[tuple[list, _StreamPrinter | None]]:
    """(results of one prompt, its stream printer or None), in prompt order; ``offset`` numbers the first
    prompt (it seeds the rows). Up to ``batch_size`` prompts run at once in the engine, later ones joining
    as earlier ones finish; with ``stream`` one prompt at a time, so streamed text never interleaves."""
    from cpm_infer.engine.generate import GenerationStats, generate_iter

    def run(chunk: list[list[int]], first: int, **options: Any) -> Iterator[list]:
        stats = GenerationStats()
        yield from generate_iter(
            runtime,
            chunk,
            job.config,
            tok,
            index_offset=first,
            stats=stats,
            draft=job.draft,
            draft_tokens=job.draft_tokens,
            **options,
        )
        if stats.speculation is not None:
            if job.speculation is None:
                job.speculation = stats.speculation
            else:
                job.speculation.add(stats.speculation)

    if not job.stream:
        for results in run(prompts, offset, max_rows=batch_size * job.config.num_samples):
            yield results, None
        return
    for index, prompt in enumerate(prompts):
        printer = _StreamPrinter()
        (results,) = run([prompt], offset + index, callback=printer)
        yield results, printer


def _print_result(record: dict, label: bool) -> None:
    if label:
        print(
            f"--- {record.get('prompt', record.get('title'))!s:.40} [sample {record['sample']}, "
            f"{record['finish_reason']}]"
        )
    print(record["text"])


class _StreamPrinter:
    """Print sequence 0 of a batch live; buffer the others (samples of the same prompt) and print
    them in order once the batch is done, so streamed text never interleaves."""

    def __init__(self) -> None:
        self.buffers: dict[int, list[str]] = {}

    def __call__(self, index: int, text: str) -> None:
        if index == 0:
            print(text, end="", flush=True)
        else:
            self.buffers.setdefault(index, []).append(text)

    def close(self) -> None:
        print(flush=True)
        for index in sorted(self.buffers):
            print("".join(self.buffers[index]), flush=True)
        self.buffers.clear()
