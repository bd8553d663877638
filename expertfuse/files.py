"""Atomic files: a reader, or a crash halfway, never sees half a file. Every single-file write of the project that
others read (checkpoints, config.pbtxt, logs, reports, manifests, run records) goes through `atomic_path`."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
