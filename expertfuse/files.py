"""Atomic files: a reader, or a crash halfway, never sees half a file. Every single-file write of the project that
others read (checkpoints, config.pbtxt, logs, reports, manifests, run records) goes through `atomic_path`. And the
one lock: `file_lock`, for writers that must not overlap (a repository's publishers, a training output folder)."""
from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from expertfuse.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` (same filesystem, same suffix so writers that infer the format from it
    still do), renamed over `path` only when the block succeeds and removed otherwise. `durable` fsyncs the file
    before the rename (checkpoints: hours of training)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def report_name(path: str | os.PathLike, run_folder: str | os.PathLike) -> str:
    """How a committed report names a file without naming the machine: as given when relative, relative to the
    run's own folder when inside it, else by its name alone."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path(run_folder).resolve()).as_posix()
    except ValueError:
        return path.name


def report_settings(args, run_folder: str | os.PathLike) -> dict[str, str]:
    """A command's flags (an argparse Namespace) as a report records them: paths (a Path, or text naming an absolute
    path, e.g. --data-root) by report_name, the rest as text."""
    return {k: report_name(v, run_folder) if isinstance(v, Path) or (isinstance(v, str) and os.path.isabs(v))
            else str(v) for k, v in vars(args).items()}


class LockBusy(UserError):
    """A lock another live process holds; `holder` names it (pid and command line)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.holder = holder


def this_process() -> str:
    """'pid 123 (python -m train --out runs/ncl)': how a lock holder names itself."""
    command = " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])
    return f"pid {os.getpid()} ({command[:200]})"


@contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the block. The kernel releases it when the holder dies,
    so a killed process leaves nothing stale (a lock file that is created and deleted would). `wait=False`: raise
    LockBusy naming the holder instead of waiting; such holders write their name into the file for that."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
            raise LockBusy(path, holder or "another process") from None
        if not wait:
            os.ftruncate(fd, 0)
            os.pwrite(fd, this_process().encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)
