"""The Ray Data actor of ``cpm batch``: one model per actor, one part file per contiguous run of prompts.

Ray Data calls it with a batch of numbered prompts (``id``, ``prompt``, ``title``, ``context``). Each run of
consecutive ids is generated in ``generate()`` calls of ``batch_size`` prompts aligned on the same boundaries as
``cpm generate --batch-size`` (prompt ``i`` is seeded by (seed, i, sample)), then written atomically as
``part-START-END``; the actor returns one summary row per part for the progress display.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.bulk.job import BulkError, BulkJob, contiguous_runs, part_name
from cpm_infer.engine.core import PromptTooLongError
from cpm_infer.engine.generate import GenerationResult, generate
from cpm_infer.engine.speculative import NGRAM
from cpm_infer.jobs import result_record
from cpm_infer.prompts import PromptLimits, prepare

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("start", "end", "rows", "new_tokens", "seconds", "worker")


class PartWriter:
    """A callable class for ``Dataset.map_batches`` (Ray keeps one instance, so one model, per actor)."""

    def __init__(self, job: BulkJob) -> None:
        from cpm_infer.backends import load_backend

        self.job = job
        self.backend, self.tokenizer = load_backend(
            job.backend, job.model, device=job.device, tokenizer_file=job.tokenizer, threads=job.threads
        )
        self.draft = None
        if job.draft is not None:
            from cpm_infer.engine.speculative import open_draft

            where = job.draft if job.draft == NGRAM else Path(job.draft)
            self.draft = open_draft(where, self.backend, self.tokenizer, device=job.device, threads=job.threads)
        self.limits = PromptLimits.of(self.backend)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        log.info("bulk worker %d: %s (%s)", os.getpid(), job.model, self.backend.name)

    def __del__(self) -> None:
        # Ray drops the instance when its actor leaves a shrinking pool: free the model (GPU memory) then,
        # not at process exit. close() is idempotent.
        for runtime in (getattr(self, "draft", None), getattr(self, "backend", None)):
            if runtime is not None:
                runtime.close()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        order = np.argsort(batch["id"], kind="stable")
        ids = np.asarray(batch["id"], dtype=np.int64)[order]
        prompt, title, context = (np.asarray(batch[c], dtype=object)[order] for c in ("prompt", "title", "context"))
        parts = []
        for start, end in contiguous_runs(ids):
            rows = range(int(np.searchsorted(ids, start)), int(np.searchsorted(ids, end)))
            began = time.perf_counter()
            records = self.generate(start, [_request(prompt[i], title[i], context[i]) for i in rows])
            self.write(start, end, records)
            tokens = sum(r["new_tokens"] for r in records)
            parts.append((start, end, len(records), tokens, time.perf_counter() - began, self.worker))
        columns = list(zip(*parts, strict=True)) if parts else [()] * len(SUMMARY_COLUMNS)
        types = {"seconds": np.float64, "worker": object}
        return {
            name: np.array(values, dtype=types.get(name, np.int64))
            for name, values in zip(SUMMARY_COLUMNS, columns, strict=True)
        }

    def generate(self, start: int, requests: list[dict[str, str]]) -> list[dict[str, Any]]:
        """All samples of prompts ``start .. start+len(requests)-1``, in ``cpm generate``'s batches."""
        size = self.job.batch_size
        records: list[dict[str, Any]] = []
        first = start
        while first < start + len(requests):
            last = min((first // size + 1) * size, start + len(requests))  # the next multiple of batch_size
            chunk = requests[first - start : last - start]
            prompts = [self.encode(first + i, req) for i, req in enumerate(chunk)]
            results = generate(
                self.backend,
                prompts,
                self.job.config,
                self.tokenizer,
                index_offset=first,
                draft=self.draft,
                draft_tokens=self.job.draft_tokens,
            )
            records += [_record(chunk[r.prompt_index - first], r, self.job.config.seed) for r in results]
            first = last
        return records

    def encode(self, index: int, request: dict[str, str]) -> list[int]:
        config = self.job.config
        try:
            prompt = prepare(
                self.tokenizer,
                request,
                self.limits,
                max_new_tokens=config.max_new_tokens,
                truncate=self.job.truncate,
                which=f"prompt {index}",
            )
        except PromptTooLongError as exc:
            raise BulkError(str(exc)) from exc
        return prompt.ids

    def write(self, start: int, end: int, records: list[dict[str, Any]]) -> None:
        """The part file, atomically: a retried or resumed run never sees half of one."""
        out = Path(self.job.output)
        final = out / part_name(start, end, self.job.fmt)
        tmp = out / f".{final.name}.tmp-{os.getpid()}"
        try:
            if self.job.fmt == "jsonl":
                with tmp.open("w", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(records, schema=PARQUET_SCHEMA), tmp)
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)


def _request(prompt: object, title: object, context: object) -> dict[str, str]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"title": str(title), "context": context if isinstance(context, str) else ""}


def _record(request: dict[str, str], result: GenerationResult, seed: int | None) -> dict[str, Any]:
    """``cpm generate --output``'s record (with the prompt's ``index``) plus the seed."""
    return result_record(request, result, seed=seed)


def _parquet_schema() -> Any:
    try:
        import pyarrow as pa
    except ImportError:  # only the Parquet output needs it
        return None
    return pa.schema(
        [
            ("index", pa.int64()),
            ("prompt", pa.string()),
            ("title", pa.string()),
            ("context", pa.string()),
            ("sample", pa.int64()),
            ("seed", pa.int64()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("new_tokens", pa.int64()),
            ("score", pa.float64()),  # beam search
            ("logprobs", pa.list_(_logprob(pa, pa.list_(_logprob(pa))))),  # --logprobs
        ]
    )


def _logprob(pa: Any, top: Any = None) -> Any:
    fields = [("token_id", pa.int64()), ("text", pa.string()), ("logprob", pa.float64())]
    return pa.struct(fields + ([("top", top)] if top is not None else []))


PARQUET_SCHEMA = _parquet_schema()
