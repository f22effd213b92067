"""``cpm generate``: text from a prompt, a title + context, or a file of prompts."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
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
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, help="Prompts in the running batch (the next joins as one finishes)."),
    ] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 100,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens")] = 0,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="0 = greedy. [default: 1.0; 0 with --num-beams]")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 = off. [default: 0]")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="1 = off. [default: 0.9]")] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 = off.")] = 1.0,
    presence_penalty: Annotated[
        float, typer.Option("--presence-penalty", help="-2..2: subtracted once from the logit of a generated id.")
    ] = 0.0,
    frequency_penalty: Annotated[
        float, typer.Option("--frequency-penalty", help="-2..2: subtracted per occurrence of a generated id.")
    ] = 0.0,
    no_repeat_ngram_size: Annotated[
        int, typer.Option("--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0 = off).")
    ] = 0,
    logprobs: Annotated[
        int | None,
        typer.Option("--logprobs", help="Per token: its logprob and the N most likely alternatives (JSONL output)."),
    ] = None,
    num_beams: Annotated[int, typer.Option("--num-beams", help="Beam search with this many beams (1 = off).")] = 1,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", help="Beam score = logprob sum / length ** this.")
    ] = 1.0,
    early_stopping: Annotated[
        bool, typer.Option("--early-stopping", help="Beam search ends once --num-beams hypotheses are done.")
    ] = False,
    num_return_sequences: Annotated[
        int, typer.Option("--num-return-sequences", help="Best beams returned per prompt.")
    ] = 1,
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
    from cpm_infer.engine.generate import truncate_prompt
    from cpm_infer.jobs import ResultsFile, pending_runs, read_requests
    from cpm_infer.prompts import essay_prompt, plain_prompt
    from cpm_infer.text import clean

    sources = sum(x is not None for x in (prompt, title, input_file))
    if sources != 1:
        raise CpmError("give exactly one of --prompt, --title (with --context) or --input")
    if resume and output is None:
        raise CpmError("--resume continues an --output file; give --output")
    if num_beams > 1:
        sampling_flags = [
            flag
            for flag, value in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p))
            if value is not None and not (flag == "--temperature" and value == 0)
        ]
        if sampling_flags:
            raise CpmError(
                f"--num-beams {num_beams} is deterministic beam search: it cannot combine with "
                f"{', '.join(sampling_flags)} (sampling)"
            )
        if stream:
            raise CpmError("--stream cannot show beam search (beams change until the end); drop --stream")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=(0.0 if num_beams > 1 else 1.0) if temperature is None else temperature,
        top_k=0 if top_k is None else top_k,
        top_p=(1.0 if num_beams > 1 else 0.9) if top_p is None else top_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        ban_unk=not allow_unk,
        banned_ids=tuple(ban_id or ()),
        stop_strings=tuple(stop or ()),
        seed=seed,
        num_samples=num_samples,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
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

    per_prompt = config.num_samples * config.num_return_sequences
    out_handle, already = ResultsFile.open(output, requests, per_prompt, resume) if output else (None, set())
    if already:
        print(f"resuming: {len(already)} of {len(requests)} prompts already in {output}", file=sys.stderr)
    done = len(already)
    try:
        # Rows are seeded by prompt index and do not depend on their batch: every run of consecutive
        # pending prompts goes through the engine at once, up to --batch-size prompts running together.
        for run in pending_runs(len(requests), len(requests), already):
            prompts = [encode(r) for r in requests[run.start : run.start + run.count]]
            for results, callback in _result_groups(runtime, prompts, config, tok, batch_size, stream, run.start):
                records = [result_record(requests[result.prompt_index], result) for result in results]
                if out_handle:
                    out_handle.write(records)  # one write per prompt: a kill never leaves half its samples
                for record in records:
                    if not out_handle and logprobs is not None:
                        print(json.dumps(record, ensure_ascii=False))
                    elif not out_handle and not stream:
                        _print_result(record, len(requests) > 1 or per_prompt > 1)
                if callback is not None:
                    callback.close()
                done += 1
    except KeyboardInterrupt as exc:
        from cpm_infer.errors import Interrupted

        kept = f"; {done} of {len(requests)} prompts written to {output} (finish with --resume)" if output else ""
        raise Interrupted(f"interrupted{kept}") from exc
    finally:
        if out_handle:
            out_handle.close()
        runtime.close()  # free the runtime's memory now (GPU buffers), not at garbage collection
    if output:
        print(f"wrote {done} prompt(s) x {per_prompt} sample(s) to {output}", file=sys.stderr)


def _result_groups(
    runtime, prompts: list[list[int]], config, tok, batch_size: int, stream: bool, offset: int
) -> Iterator[tuple]:
    """(results of one prompt, its stream printer or None), in prompt order; ``offset`` numbers the first
    prompt (it seeds the rows). Up to ``batch_size`` prompts run at once in the engine, later ones joining
    as earlier ones finish; with ``stream`` one prompt at a time, so streamed text never interleaves."""
    from cpm_infer.engine.generate import generate_iter

    if not stream:
        rows = batch_size * config.num_samples
        for results in generate_iter(runtime, prompts, config, tok, max_rows=rows, index_offset=offset):
            yield results, None
        return
    for index, prompt in enumerate(prompts):
        printer = _StreamPrinter()
        (results,) = generate_iter(runtime, [prompt], config, tok, callback=printer, index_offset=offset + index)
        yield results, printer


def result_record(request: dict, result) -> dict:
    """One JSONL output record: the prompt's index and fields, the text and how it ended (+ logprobs when
    asked, the score of a beam)."""
    record = {
        "index": result.prompt_index,
        **request,
        "sample": result.sample_index,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.token_ids),
    }
    if result.score is not None:
        record["score"] = result.score
    if result.logprobs is not None:
        record["logprobs"] = [
            {
                "token_id": step.token_id,
                "text": step.token_text,
                "logprob": step.logprob,
                "top": [{"token_id": i, "text": t, "logprob": v} for i, t, v in step.top],
            }
            for step in result.logprobs
        ]
    return record


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
