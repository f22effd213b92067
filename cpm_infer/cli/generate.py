"""``cpm generate``: text from a prompt, a title + context, or a file of prompts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from cpm_infer.cli.options import BackendOpt, DeviceOpt, ModelOpt, ThreadsOpt, TokenizerOpt
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)


def generate(
    model: ModelOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Plain prompt text.")] = None,
    title: Annotated[
        str | None, typer.Option("--title", help="Essay title: the prompt is `title <sep> context`.")
    ] = None,
    context: Annotated[str, typer.Option("--context", help="Text after the title (with --title).")] = "",
    input_file: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="Prompts, one per line; or JSONL with prompt or title/context per line."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write results as JSONL here.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the results already in --output; generate only the prompts left.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts generated together.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 100,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens")] = 0,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="1 = off.")] = 0.9,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 = off.")] = 1.0,
    ban_id: Annotated[
        list[int] | None, typer.Option("--ban-id", help="Token id never to generate (repeatable).")
    ] = None,
    allow_unk: Annotated[bool, typer.Option("--allow-unk", help="Allow <unk> (banned by default).")] = False,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples per prompt.")] = 1,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at <eod>.")] = False,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Keep the last tokens of prompts that are too long.")
    ] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is generated.")] = False,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Generate text with a CPM model (checkpoint or exported artifact)."""
    from cpm_infer.backends import load_backend
    from cpm_infer.cli._common import resolve_model
    from cpm_infer.config import GenerationConfig
    from cpm_infer.generate import generate as run_generation
    from cpm_infer.generate import truncate_prompt
    from cpm_infer.jobs import ResultsFile, pending_runs, read_requests
    from cpm_infer.prompts import essay_prompt, plain_prompt
    from cpm_infer.text import clean

    sources = sum(x is not None for x in (prompt, title, input_file))
    if sources != 1:
        raise CpmError("give exactly one of --prompt, --title (with --context) or --input")
    if resume and output is None:
        raise CpmError("--resume continues an --output file; give --output")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        ban_unk=not allow_unk,
        banned_ids=tuple(ban_id or ()),
        stop_strings=tuple(stop or ()),
        seed=seed,
        num_samples=num_samples,
        ignore_eos=ignore_eos,
    )
    requests = (
        read_requests(input_file)
        if input_file
        else [
            {"prompt": clean(prompt, "--prompt")}
            if prompt is not None
            else {"title": clean(title, "--title"), "context": clean(context, "--context")}
        ]
    )

    model_path = resolve_model(model)
    runtime, tok = load_backend(backend, model_path, device=device, tokenizer_file=tokenizer, threads=threads)
    n_positions = runtime.spec.n_positions

    def encode(req: dict) -> list[int]:
        ids = (
            essay_prompt(tok, req["title"], req.get("context", ""))
            if "title" in req
            else plain_prompt(tok, req["prompt"])
        )
        return truncate_prompt(ids, n_positions, max_new_tokens) if truncate else ids

    if stream:
        batch_size = 1  # one sequence at a time, so streamed text never interleaves
    out_handle, already = ResultsFile.open(output, requests, config.num_samples, resume) if output else (None, set())
    if already:
        print(f"resuming: {len(already)} of {len(requests)} prompts already in {output}", file=sys.stderr)
    done = len(already)
    try:
        for run in pending_runs(len(requests), batch_size, already):
            chunk = requests[run.start : run.start + run.count]
            callback = _StreamPrinter() if stream else None
            results = run_generation(
                runtime, [encode(r) for r in chunk], config, tok, callback=callback, index_offset=run.start
            )
            records = []
            for result in results:
                req = requests[result.prompt_index]
                record = {
                    "index": result.prompt_index,
                    **req,
                    "sample": result.sample_index,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "new_tokens": len(result.token_ids),
                }
                records.append(record)
                if not out_handle and not stream:
                    _print_result(record, len(requests) > 1 or config.num_samples > 1)
            if callback is not None:
                callback.close()
            if out_handle:
                out_handle.write(records)  # one write per batch: a kill never leaves half a prompt's samples
            done += len(chunk)
    except KeyboardInterrupt as exc:
        from cpm_infer.errors import Interrupted

        kept = f"; {done} of {len(requests)} prompts written to {output} (finish with --resume)" if output else ""
        raise Interrupted(f"interrupted{kept}") from exc
    finally:
        if out_handle:
            out_handle.close()
    if output:
        print(f"wrote {done} prompt(s) x {config.num_samples} sample(s) to {output}", file=sys.stderr)


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
