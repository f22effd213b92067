"""Write a directory atomically: build it in a temporary sibling, then swap it in by renames.

Checkpoints, exported artifacts, engines and trainer saves all use this, so an interrupted or failed
write never leaves a half-written directory, and an existing one is replaced only once the new one is
complete. A process killed outright (SIGKILL, out of memory) cannot clean up after itself: the next
write to the same place removes the siblings whose writer is gone and says so (a previous version
left aside mid-swap is put back instead), so there is at most one staging directory per target.

Whether a writer is alive is told by a lock file next to its staging directory
(``.NAME.tmp-PID.lock``, held with ``flock`` while it writes: the kernel releases it when the process
dies, however it dies), so a reused PID is never mistaken for the writer.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)

# .NAME.tmp-PID (being written), .NAME.old-PID (the previous version during a swap),
# .NAME.staging-PID (trainer saves of earlier versions)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|staging)-(?P<pid>\d+)(?P<lock>\.lock)?$")


class BusyError(CpmError):
    """Another live process is writing the same directory."""


class DiskFullError(CpmError):
    """The disk filled up while a directory was written; nothing of it was left behind."""


def swap_in(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``. An existing ``dest`` is first renamed aside (``.NAME.old-PID``) and
    removed only after the new one is in place, so a crash between the renames loses neither."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        _remove(old)
        dest.rename(old)
        staging.rename(dest)
        _remove(old)
    else:
        staging.rename(dest)


def clean_stale(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging siblings of ``dest`` whose writer is gone (logging each); a previous version
    left aside by a writer killed mid-swap is put back at ``dest`` when ``dest`` is missing. Raises
    BusyError if a live process is writing ``dest``. Returns what was removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    # Directories first (newest first), then lock files left without one.
    siblings = sorted(dest.parent.glob(f".{dest.name}.*-*"), key=lambda p: (p.name.endswith(".lock"), -_mtime(p)))
    for path in siblings:
        match = _SIBLING.match(path.name)
        if match is None or match["name"] != dest.name:
            continue
        pid = int(match["pid"])
        alive = pid == os.getpid() or _writer_alive(dest, pid)
        if match["lock"]:
            if not alive:  # a writer killed before it made its staging directory
                path.unlink(missing_ok=True)
            continue
        if alive:
            if match["kind"] != "old" and pid != os.getpid():
                raise BusyError(f"{dest} is being written by process {pid} ({path.name}); wait for it or stop it")
            continue
        if match["kind"] == "old" and not dest.exists():
            path.rename(dest)
            log.warning("restored %s from %s, left aside by process %d, which died while replacing it", dest, path, pid)
            continue
        _remove(path)
        _lock_path(dest, pid).unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s, left by process %d, which is gone", path, pid)
    return removed


@contextmanager
def staged_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest``; if the block succeeds it replaces ``dest``
    (``swap_in``), on any error or interrupt it is removed and ``dest`` is left as it was. Stale
    siblings of earlier killed writers are removed first (``clean_stale``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with _held(_lock_path(dest, os.getpid())):
        clean_stale(dest)
        _remove(tmp)
        tmp.mkdir()
        try:
            yield tmp
            swap_in(tmp, dest)
        except Exception as exc:
            if _disk_full(exc):
                kept = "the previous version is kept" if dest.exists() else "nothing was written"
                raise DiskFullError(f"no space left on the device while writing {dest}: {kept}") from exc
            raise
        finally:
            _remove(tmp)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library reports it in its own exception type (torch, safetensors)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def _lock_path(dest: Path, pid: int) -> Path:
    """The lock file process ``pid`` holds while it writes ``dest`` (its tmp and old siblings)."""
    return dest.with_name(f".{dest.name}.tmp-{pid}.lock")


@contextmanager
def _held(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created, and removed at the end)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _writer_alive(dest: Path, pid: int) -> bool:
    """Process ``pid``, a writer of ``dest``, is alive if it holds its lock file; without one (a writer
    of an earlier version), if process ``pid`` exists."""
    lock = _lock_path(dest, pid)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return _pid_alive(pid)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
