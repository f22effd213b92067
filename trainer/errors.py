"""Trainer error types: each is a CpmError, so the CLI prints one line and exits 1."""

from __future__ import annotations

from cpm_infer.documents import DataError
from cpm_infer.errors import CpmError

__all__ = ["DataError", "ResumeError", "TrainError", "TrainingInterrupted"]


class TrainError(CpmError):
    """An inconsistent training setup (max_len above context, vocab mismatch, bad option)."""


class ResumeError(CpmError):
    """A checkpoint cannot be resumed (absent, incomplete, or from a different setup)."""


class TrainingInterrupted(CpmError):
    """Ctrl-C (or a stop request) ended training after a resumable checkpoint was saved."""
