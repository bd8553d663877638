"""Helpers the test modules share (plain functions and constants; fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from expertfuse.parity import EXPORT_FP32, Tolerance, compare, float32_error
from expertfuse.preprocess import normalize_pixels
from export.gate import expert_references
from export.onnx import export_graph
from train.checkpoint import CheckpointPayload, save_checkpoint
from train.data.synthetic import synthesize
from train.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]

# A tiny but real training setup: 3 ResNet-8 experts on a few hundred synthetic images.
TINY_TRAIN = ["--dataset", "synthetic", "--arch", "resnet8", "--synthetic-max", "120", "--imb-factor", "20",
              "--synthetic-test", "10", "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "0",
              "--schedule", "multistep", "--milestones", "--hcm-n", "3"]


def run_module(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root, as a user would."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def in_process(entry, args, check: bool) -> SimpleNamespace:
    """An entry function run on `args` through the commands' one CLI runner, in this process: (returncode, stdout,
    stderr) as the command would give them; with `check`, a non-zero exit fails the test with its stderr."""
    from expertfuse.cli import run_cli
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = run_cli(lambda: entry(list(args)))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    if check and code != 0:
        raise AssertionError(f"exited {code}: {stderr.getvalue()[-3000:]}")
    return SimpleNamespace(stdout=stdout.getvalue(), stderr=stderr.getvalue(), returncode=code)


def export_cli(*args: str, check: bool = True) -> SimpleNamespace:
    """`python -m export.onnx ARGS` run by its own entry function in this process: the exporter's imports and
    torch.onnx's registry (seconds) are paid once per test worker instead of once per export. Tests of signals, of
    what a process leaves behind and of each command's own one-line errors run the real process (run_module)."""
    from export.onnx import export_onnx
    return in_process(export_onnx, args, check)


def train_cli(*args: str, check: bool = True) -> SimpleNamespace:
    """`python -m train ARGS` run in this process (as export_cli): the real training steps without another
    process's torch start-up (seconds)."""
    from train.config import config_from_args
    from train.engine import train
    return in_process(lambda argv: train(config_from_args(argv)), args, check)


def convert_cli(*args: str) -> SimpleNamespace:
    """`python -m train.convert ARGS` run in this process, for conversions a test expects to succeed (as
    train_cli); refusals run the real process (run_module)."""
    from train.convert import build_parser, convert
    return in_process(lambda argv: convert(build_parser().parse_args(argv)), args, check=True)


def make_checkpoint(path: Path, **spec_fields) -> Path:
    """A checkpoint of an untrained network whose BatchNorm statistics were calibrated on real-looking images
    (fast, and with the activation scales of a trained model)."""
    torch.manual_seed(0)
    spec = ModelSpec(**{"arch": "resnet8", "num_classes": 10, "num_experts": 3, **spec_fields})
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    pixels = torch.from_numpy(synthesize([64], seed=3)[0])
    with torch.no_grad():
        for batch in pixels.split(16):
            model.train()(normalize_pixels(batch, spec.mean, spec.std))
    payload = CheckpointPayload(spec=spec, classes=[f"class{i}" for i in range(spec.num_classes)],
                                train_counts=[100] * spec.num_classes, state_dict=model.state_dict(), method="ncl",
                                epoch=1)
    return save_checkpoint(payload.to_dict(), path)


def ort_logits(path: Path, images: np.ndarray, output: str = "logits") -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([output], {"image": images})[0]


ALLCLOSE_1E4 = Tolerance("allclose-1e-4", rtol=1e-4, atol=1e-4)  # two float32 graphs of a small model


def export_both_fusions(job, tmp_path: Path, outputs=("logits",), batch: int = 6) -> dict:
    """Export `loop` and `grouped`, run both in ONNX Runtime and check: logits pass export's FP32 gate against the
    float64 reference and every output agrees between the two strategies."""
    images = np.random.RandomState(1).randint(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    ref64, ref32 = (logits.mean(1) for logits in expert_references(job, torch.from_numpy(images), job.opts.experts, batch))
    results = {}
    for fusion in ("loop", "grouped"):
        path = export_graph(job, fusion, tmp_path / fusion, 18)
        results[fusion] = {name: ort_logits(path, images, name) for name in ("logits", *outputs)}
        assert compare(results[fusion]["logits"], ref64, EXPORT_FP32, float32_error(ref32, ref64)).ok
    for name in results["loop"]:
        assert compare(results["loop"][name], results["grouped"][name], ALLCLOSE_1E4).ok, name
    return results["grouped"]
