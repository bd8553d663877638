"""Shared fixtures: small real data written by the tests themselves, and tiny training configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny but real training setup: 3 ResNet-8 experts on a few hundred synthetic images.
TINY_TRAIN = ["--dataset", "synthetic", "--arch", "resnet8", "--synthetic-max", "120", "--imb-factor", "20",
              "--synthetic-test", "30", "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "0",
              "--schedule", "multistep", "--milestones", "--hcm-n", "3"]


def run_module(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root, as a user would."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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
