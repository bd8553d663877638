"""Helpers the test modules share (plain functions and constants; fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
