"""The Ray Data pipeline of ``cpm batch``.

Input files, parsed in Ray tasks (text/JSONL exactly as ``cpm generate --input`` reads them; Parquet with
read_parquet) -> prompts (``prompt`` | ``title`` + ``context``) numbered 0..n-1 in input order, those that finished
parts cover dropped -> ``map_batches(PartWriter)`` on a pool of actors, each holding one model -> one summary row
per written part, read here for the progress.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayError

from cpm_infer.bulk.job import (
    BulkError,
    BulkJob,
    covered,
    describe_inputs,
    finished_ranges,
    input_kind,
    open_output,
    request_from_record,
)
from cpm_infer.bulk.worker import PartWriter
from cpm_infer.errors import CpmError, describe
from cpm_infer.jobs import read_requests

log = logging.getLogger(__name__)

_PROMPT_COLUMNS = ("prompt", "title", "context")


@dataclass
class Progress:
    total: int  # prompts in the input
    skipped: int  # finished by an earlier run
    done: int = 0  # finished by this run
    rows: int = 0  # prompt x sample results written by this run
    new_tokens: int = 0
    parts: int = 0
    elapsed_s: float = 0.0
    workers: set[str] = field(default_factory=set)  # the actors (host:pid) that wrote parts

    @property
    def todo(self) -> int:
        return self.total - self.skipped


@dataclass(frozen=True)
class Pool:
    """The actor pool: how many actors (models) and what each reserves."""

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    prompts_per_part: int = 256  # one map_batches call = one part file (the unit a rerun skips)

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus <= 0 or self.gpus < 0 or self.prompts_per_part < 1:
            raise BulkError(f"invalid pool: {self}")


def run(
    job: BulkJob,
    inputs: list[Path],
    pool: Pool,
    on_progress: Callable[[Progress], None] | None = None,
) -> Progress:
    """Generate every prompt of ``inputs`` not yet in ``job.output``; needs a connected Ray (``cluster.connected``)."""
    described = describe_inputs(inputs)
    if job.threads is None:  # each actor's intra-op threads: its CPU share, so actors on one node do not fight
        job = dataclasses.replace(job, threads=max(1, math.floor(pool.cpus)))
    with _data_context(), _one_line_errors():
        finished = finished_ranges(job.output)
        todo, total = _numbered(_read(inputs), finished, pool.prompts_per_part)
        if total == 0:
            raise BulkError(f"{', '.join(map(str, inputs))}: no prompts")
        rerun = open_output(job, described, total)
        progress = Progress(total=total, skipped=total - sum(len(t) for t in todo))
        log.info("%d prompts; %d finished earlier%s", total, progress.skipped, " (rerun)" if rerun else "")
        if on_progress is not None:
            on_progress(progress)
        if not todo:
            return progress
        results = ray.data.from_arrow(todo).map_batches(
            PartWriter,
            fn_constructor_kwargs={"job": job},
            batch_size=pool.prompts_per_part,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
        )
        started = time.perf_counter()
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            progress.done += int(np.sum(batch["end"] - batch["start"]))
            progress.rows += int(np.sum(batch["rows"]))
            progress.new_tokens += int(np.sum(batch["new_tokens"]))
            progress.parts += len(batch["start"])
            progress.workers.update(str(w) for w in batch["worker"])
            progress.elapsed_s = time.perf_counter() - started
            if on_progress is not None:
                on_progress(progress)
    return progress


def _read(inputs: list[Path]) -> ray.data.Dataset:
    paths = [str(p.resolve()) for p in inputs]
    if input_kind(inputs[0]) == "parquet":
        return ray.data.read_parquet(paths, include_paths=True).map_batches(_records_to_prompts, batch_format="pyarrow")
    # A task per file, parsed by the same function as `cpm generate --input` (encoding, text policy, JSON lines).
    files = ray.data.from_items([{"path": path} for path in paths])
    return files.map_batches(_file_to_prompts, batch_size=1, batch_format="pyarrow")


def _file_to_prompts(batch: pa.Table) -> pa.Table:
    return _prompt_table([r for path in batch["path"].to_pylist() for r in read_requests(Path(path))])


def _records_to_prompts(batch: pa.Table) -> pa.Table:
    names = set(batch.column_names)
    if not names & {"prompt", "title"}:
        where = batch["path"][0].as_py() if len(batch) else "a Parquet input"
        raise BulkError(f'{where}: needs a "prompt" or a "title" column (it has {", ".join(sorted(names))})')
    none = [None] * len(batch)
    prompt, title, context = (batch[c].to_pylist() if c in names else none for c in _PROMPT_COLUMNS)
    paths = batch["path"].to_pylist()
    return _prompt_table([request_from_record(*row) for row in zip(prompt, title, context, paths, strict=True)])


def _prompt_table(requests: list[dict[str, str]]) -> pa.Table:
    return pa.table({c: pa.array([r.get(c) for r in requests], type=pa.string()) for c in _PROMPT_COLUMNS})


def _numbered(prompts: ray.data.Dataset, finished: list[tuple[int, int]], rows: int) -> tuple[list[pa.Table], int]:
    """Number the prompts 0..n-1 in input order (blocks arrive in order: ``preserve_order``) and keep those that
    no finished part covers, in tables of ``rows`` prompts: one block per part, so that the parts of one input
    file spread over every actor. Only the prompts pass through this process, never the generated text."""
    todo, total = [], 0
    for block in prompts.iter_batches(batch_size=None, batch_format="pyarrow"):
        ids = np.arange(total, total + len(block), dtype=np.int64)
        total += len(block)
        keep = ~covered(ids, finished)
        if keep.any():
            kept = block.append_column("id", pa.array(ids)).filter(pa.array(keep))
            todo += [kept.slice(start, rows) for start in range(0, len(kept), rows)]
    return todo, total


@contextmanager
def _data_context() -> Iterator[None]:
    """Ordered execution (the positional numbering needs it) and no Ray progress bars (the CLI draws its own)."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A failure inside a Ray task arrives wrapped (task error, user-code error): surface the project's own
    error, or one line naming the original one."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, CpmError) and not isinstance(exc, RayError):
            raise
        cause = _project_error(exc)
        if cause is not None:
            raise BulkError(str(cause)) from exc
        raise BulkError(f"bulk generation failed: {describe(exc, last=True)}") from exc


def _project_error(exc: BaseException) -> CpmError | None:
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CpmError) and not isinstance(current, RayError):  # (Ray's copies subclass it)
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None
