"""Shared fixtures: small real data written by the tests themselves, and tiny training configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_TRAIN, run_module


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real NCL checkpoint from 2 epochs of tiny training, shared by tests that only read it."""
    out = tmp_path_factory.mktemp("tiny-ncl")
    run_module("train", "--method", "ncl", *TINY_TRAIN, "--epochs", "2", "--out", str(out))
    return out / "ncl.pt"


@pytest.fixture(scope="session")
def exported_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """A model repository written by the export stage: the fused ensemble and the naive (unfused) one."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    common = ["--ckpt", str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16"]
    run_module("export.onnx", *common, "--fusion", "grouped")
    run_module("export.onnx", *common, "--naive-ensemble")
    return repo


@pytest.fixture(scope="session")
def triton(exported_repository):
    """The real Triton bundled in nvidia-pytriton, on free 127.0.0.1 ports, stopped by its own pid."""
    from serve.server import TritonServer
    with TritonServer(exported_repository, "bundled", ready_timeout=120) as server:
        yield server
