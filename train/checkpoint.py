"""The checkpoint: the contract between training and export.

One `.pt` file, loadable with `torch.load(weights_only=True)`, holding the plain dict of a
`CheckpointPayload`: format, version, spec (ModelSpec as a dict), classes, train_counts, state_dict,
method, config, metrics, epoch, and (in the `last` file only) `training`, the state --resume needs.
`load_model(path)` rebuilds the exact network from the file alone; `load_payload(path)` reads it typed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertfuse.errors import UserError
from expertfuse.files import atomic_path
from train.models import ModelSpec, MultiExpertNet, build_model

FORMAT = "expertfuse-checkpoint"
VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_PROTOCOL = b"\x80"  # the legacy torch.save format and plain pickles start with a protocol opcode


class CheckpointError(UserError):
    """A checkpoint that is missing, not ours, from an unknown version, or inconsistent."""


@dataclass
class CheckpointPayload:
    """What a checkpoint holds, typed; `to_dict()` is what is saved, `from_dict()` checks what is loaded."""

    spec: ModelSpec
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    train_counts: list[int] = field(default_factory=list)
    method: str = ""
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    training: dict | None = None  # optimizer, scheduler, RNG... : only in the file --resume reads

    def to_dict(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(), "classes": list(self.classes),
                "train_counts": list(self.train_counts), "state_dict": self.state_dict, "method": self.method,
                "config": self.config, "metrics": self.metrics, "epoch": self.epoch}
        if self.training is not None:
            data["training"] = self.training
        return data

    @classmethod
    def from_dict(cls, data, source: str = "checkpoint") -> "CheckpointPayload":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not an expertfuse checkpoint (official checkpoints: python -m train.convert)")
        if data.get("version") != VERSION:
            raise CheckpointError(f"{source} has checkpoint version {data.get('version')!r}; "
                                  f"this expertfuse reads version {VERSION}")
        for key in ("spec", "state_dict", "classes"):
            if key not in data:
                raise CheckpointError(f"{source} lacks '{key}'")
        return cls(spec=ModelSpec.from_dict(data["spec"]), classes=list(data["classes"]), state_dict=data["state_dict"],
                   train_counts=list(data.get("train_counts", [])), method=data.get("method", ""),
                   config=data.get("config", {}), metrics=data.get("metrics", {}), epoch=data.get("epoch", 0),
                   training=data.get("training"))


def save_checkpoint(payload: CheckpointPayload | dict, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.
    A dict is a loaded checkpoint a tool changed; it is checked like a payload before it is written."""
    data = payload.to_dict() if isinstance(payload, CheckpointPayload) \
        else CheckpointPayload.from_dict({"format": FORMAT, "version": VERSION, **payload}).to_dict()
    with atomic_path(path, durable=True) as tmp:
        torch.save(data, tmp)
    return Path(path)


def read_torch_file(path: str | os.PathLike, kind: str = "expertfuse checkpoint",
                    writer: str = "python -m train or python -m train.convert"):
    """torch.load(weights_only=True) of a file, every failure one line: a missing file, a file that is not a
    PyTorch file at all (neither zip nor pickle: torch would only say 'invalid load key' or an opcode number),
    or one the weights-only unpickler refuses."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL)):
        raise CheckpointError(f"{path} is not a readable {kind} (not a PyTorch file: neither a zip archive nor a "
                              f"pickle); give a file written by {writer}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable {kind} ({_load_failure(exc)})") from None


def load_payload(path: str | os.PathLike) -> CheckpointPayload:
    """The checkpoint at `path`, typed and checked."""
    return CheckpointPayload.from_dict(read_torch_file(path), str(path))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at `path` as its plain dict (checked like load_payload)."""
    return load_payload(path).to_dict()


def _load_failure(exc: Exception) -> str:
    """The one useful sentence of a torch.load failure: the weights-only unpickler's reason when there is one
    (torch wraps it in several lines of advice about weights_only=False, which we never follow)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = match.group(1) if match else next((line.strip() for line in text.splitlines() if line.strip()),
                                                type(exc).__name__)
    return reason.split(". ")[0][:160]


def model_from_payload(payload: CheckpointPayload, source: str = "checkpoint") -> MultiExpertNet:
    """The network the payload's spec describes, with its weights; a mismatch is a one-line CheckpointError."""
    spec = payload.spec
    model = build_model(spec)
    try:
        result = model.load_state_dict(payload.state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: state_dict does not match its spec ({spec.describe()}): "
                              f"{str(exc).splitlines()[-1].strip()[:200]}") from None
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
    payload = load_payload(path)
    return model_from_payload(payload, str(path)).eval(), payload.to_dict()
