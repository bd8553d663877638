"""Tie a started Triton's life to the process that launched it, and clean up after launchers that died.

A server outlives a launcher killed with SIGKILL unless something ties them: the server gets a
parent-death signal (Linux prctl), and every run records in its temporary folder who launched it
and which server it started. The next start removes the runs of dead launchers: it kills a server
still running from one (its own process group), removes its /dev/shm regions and its folder.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from expertfuse.files import write_text

RUN_PREFIX = "expertfuse-triton-"
RECORD = "launcher.json"
_PR_SET_PDEATHSIG = 1


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a later one that reuses its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def die_with_launcher():
    """A preexec_fn: the child gets SIGTERM when the launcher dies (Linux), and exits at once if it
    already has. The kernel watches the thread that started the child, so start servers from a
    thread that lives as long as they should. None elsewhere: there the next start's cleanup is the only tie."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, launcher = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != launcher:
            os._exit(1)
    return in_child


def write_record(run_dir: Path, shm_prefix: str, server_pid: int | None = None) -> None:
    """Record (atomically) this launcher, the server it started and the server's shm prefix."""
    record = {"launcher_pid": os.getpid(), "launcher_start": process_start(os.getpid()), "shm_prefix": shm_prefix,
              "server_pid": server_pid, "server_start": process_start(server_pid) if server_pid else None}
    write_text(run_dir / RECORD, json.dumps(record))


def read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


def remove_shm(prefix: str) -> None:
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


def clean_stale_runs(tmp: Path | None = None) -> list[str]:
    """Remove the runs whose launcher is dead: their server (process group), shm regions and folder.
    Runs of live launchers, and folders without a record, are left alone. Returns what was removed."""
    removed = []
    for run_dir in sorted(Path(tmp or tempfile.gettempdir()).glob(f"{RUN_PREFIX}*")):
        record = read_record(run_dir)
        if record is None or process_start(record["launcher_pid"]) == record["launcher_start"]:
            continue
        server = record.get("server_pid")
        if server and process_start(server) == record.get("server_start"):
            try:
                os.killpg(server, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        remove_shm(record["shm_prefix"])
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(str(run_dir))
    return removed
