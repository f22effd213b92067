"""Bulk generation on Ray Data (``cpm batch``): many prompts, many model replicas, resumable output.

- ``job``       the job (model, settings, output directory), its manifest, prompt parsing, the finished parts.
- ``worker``    the Ray Data actor: one model per actor; writes each contiguous run of prompts as one part file.
- ``pipeline``  read (JSONL/text/Parquet) -> number the prompts -> skip finished ones -> ``map_batches`` over
                the actor pool -> progress.

A prompt's samples are seeded by (seed, prompt index, sample index), exactly as ``cpm generate`` seeds them, so
the output equals a single-process run over the same prompts. Importing ``job`` and ``worker`` needs no Ray.
"""
