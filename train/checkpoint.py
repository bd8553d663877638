"""The checkpoint: the contract between training and export.

One `.pt` file, loadable with `torch.load(weights_only=True)`, holding a plain dict:
  format, version, spec (ModelSpec as a dict), classes, train_counts, state_dict,
  method, config, metrics, epoch, and (in the `last` file only) `training`, the state --resume needs.
`load_model(path)` rebuilds the exact network from the file alone.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from expertfuse.errors import UserError
from train.models import ModelSpec, MultiExpertNet, build_model

FORMAT = "expertfuse-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, not ours, from an unknown version, or inconsistent."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable expertfuse checkpoint ({_load_failure(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an expertfuse checkpoint (official checkpoints: python -m train.convert)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')!r}; this expertfuse reads version {VERSION}")
    for key in ("spec", "state_dict", "classes"):
        if key not in data:
            raise CheckpointError(f"{path} lacks '{key}'")
    return data


def _load_failure(exc: Exception) -> str:
    """The one useful sentence of a torch.load failure: the weights-only unpickler's reason when there is one
    (torch wraps it in several lines of advice about weights_only=False, which we never follow)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = match.group(1) if match else next((line.strip() for line in text.splitlines() if line.strip()),
                                                type(exc).__name__)
    return reason.split(". ")[0][:160]


def model_from_checkpoint(data: dict, source: str = "checkpoint") -> MultiExpertNet:
    spec = ModelSpec.from_dict(data["spec"])
    model = build_model(spec)
    result = model.load_state_dict(data["state_dict"], strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise CheckpointError(f"{source}: state_dict does not match its spec ({spec.describe()}): {'; '.join(problems)}")
    return model


def load_model(path: str | os.PathLike) -> tuple[MultiExpertNet, dict]:
    """(network in eval mode, checkpoint dict) from a checkpoint file alone."""
    data = load_checkpoint(path)
    try:
        model = model_from_checkpoint(data, str(path))
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: state_dict does not match its spec: {str(exc).splitlines()[-1].strip()[:200]}") from None
    return model.eval(), data
