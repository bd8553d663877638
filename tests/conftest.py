"""Shared fixtures: small real data written by the tests themselves, and tiny training configs.

The suite runs on pytest-xdist workers (`-n auto` in pyproject). What tests only read (the trained checkpoint, the
exported repository) is built once per run, by whichever worker asks first, in the folder all workers share; the
others wait on a lock the kernel releases if the builder dies. Each worker that needs Triton starts its own on free
ports (a server's lifetime must belong to one process)."""
from __future__ import annotations

import os
import shutil

# Before torch is imported (tests.helpers imports it): two workers on two cores must not each spin up a thread per
# core, in their own process or in the `python -m` processes they start.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from expertfuse.files import file_lock  # noqa: E402
from tests.helpers import TINY_TRAIN, export_cli, train_cli  # noqa: E402


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> Path:
    """The folder every worker of this run shares (the per-worker base temp's parent under xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(run_root: Path, name: str, build) -> Path:
    """`build(folder)` run once per test run, whichever worker comes first; the rest reuse its folder."""
    folder, done = run_root / name, run_root / f"{name}.done"
    with file_lock(run_root / f"{name}.lock"):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(run_root) -> Path:
    """A real NCL checkpoint from 2 epochs of tiny training, shared by tests that only read it."""
    def train(out: Path) -> None:
        train_cli("--method", "ncl", *TINY_TRAIN, "--epochs", "2", "--out", str(out))
    return built_once(run_root, "tiny-ncl", train) / "ncl.pt"


@pytest.fixture(scope="session")
def exported_repository(tiny_checkpoint, run_root) -> Path:
    """A model repository written by the export stage: the fused ensemble and the naive (unfused) one."""
    def export(folder: Path) -> None:
        common = ["--ckpt", str(tiny_checkpoint), "--out", str(folder / "model_repository"), "--max-batch", "16"]
        export_cli(*common, "--fusion", "grouped")
        export_cli(*common, "--naive-ensemble")
    return built_once(run_root, "repo", export) / "model_repository"


@pytest.fixture(scope="session")
def fused_only_repository(exported_repository, run_root) -> Path:
    """The exported repository's fused model alone: for tests of a server's lifetime, where the other four models
    (each its own python-backend process in the bundled Triton) would only add start-up work."""
    def copy(folder: Path) -> None:
        shutil.copytree(exported_repository / "ncl", folder / "model_repository" / "ncl")
    return built_once(run_root, "repo-fused", copy) / "model_repository"


@pytest.fixture(scope="session")
def triton(exported_repository):
    """The real Triton bundled in nvidia-pytriton, on free 127.0.0.1 ports, stopped by its own pid."""
    from serve.server import TritonServer
    with TritonServer(exported_repository, "bundled", ready_timeout=120) as server:
        yield server
