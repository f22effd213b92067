"""Write a directory atomically: build it in a temporary sibling, then swap it in by renames.

Checkpoints, exported artifacts and engines all use this, so an interrupted or failed write never
leaves a half-written directory, and an existing one is replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def swap_in(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``. An existing ``dest`` is first renamed aside (``.NAME.old-PID``) and
    removed only after the new one is in place, so a crash between the renames loses neither."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(dest)


@contextmanager
def staged_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest``; if the block succeeds it replaces ``dest``
    (``swap_in``), on any error or interrupt it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
