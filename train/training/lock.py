"""One training run per output folder, taken before torch is imported (python -m train refuses a busy --out at
once) and again, as a no-op, by the engine for runs started in code."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from expertfuse.errors import UserError
from expertfuse.files import LockBusy, file_lock
from train.config import TrainConfig

RUN_LOCK = ".train.lock"
_held: set[Path] = set()  # folders this process holds: a flock taken twice by one process would refuse itself


@contextmanager
def output_folder_lock(cfg: TrainConfig) -> Iterator[None]:
    """One run per output folder (a fresh one or --resume): a second run into it would overwrite the first's
    checkpoints and log as they are written. A flock the kernel drops when the run dies; under torchrun rank 0
    takes it (the other ranks write nothing there)."""
    out = Path(cfg.out)
    key = out.resolve()
    if os.environ.get("RANK", "0") != "0" or key in _held:
        yield
        return
    with ExitStack() as stack:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(out / RUN_LOCK, wait=False))
        except LockBusy as exc:
            raise UserError(f"--out {out} is in use by another training run, {exc.holder}; wait for it to finish "
                            "or choose another --out") from None
        except OSError as exc:
            raise UserError(f"--out {out}: {exc.strerror or exc}") from None
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
