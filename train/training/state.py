"""Training state: seeding, RNG snapshots, what --resume restores, and the checkpoint payload of an epoch."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from expertfuse.errors import UserError
from train.checkpoint import CheckpointPayload, load_checkpoint
from train.training.distributed import Distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (so a weights-only load reads it back)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


@dataclass
class Progress:
    """Where training stands: the next epoch, the stage, the best result so far, and (after a resume) the saved
    optimizer and scheduler states the first stage's fresh ones load."""

    start_epoch: int = 0
    stage: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None


def read_resume_state(run) -> dict:
    """The checkpoint --resume continues from, refusing one without training state, one of another model than the
    flags build, and one that has trained all its epochs already."""
    path, cfg = run.cfg.resume_checkpoint(), run.cfg
    state = load_checkpoint(path)
    if "training" not in state:
        raise UserError(f"--resume: {path} holds no training state")
    saved, asked = state["spec"], run.spec.to_dict()
    differ = [k for k in asked if k in saved and saved[k] != asked[k]]
    if differ:
        describe = lambda spec: ", ".join(f"{k} {spec[k]}" for k in differ)  # noqa: E731
        raise UserError(f"--resume: {path} holds a model with {describe(saved)}, the flags ask for {describe(asked)}: "
                        f"resume with the checkpoint's settings, or train the new model into another --out")
    if state["epoch"] >= run.total_epochs:
        raise UserError(f"--resume: {path} has trained all {run.total_epochs} epochs already; nothing to train "
                        f"(raise --epochs to train further)")
    changed = sorted(k for k, v in state["config"].items()
                     if k not in ("epochs", "resume") and asdict(cfg).get(k) != v)
    if changed and run.env.main:
        print(f"resume: settings differ from the checkpoint's: {', '.join(changed)}")
    return state


def restore(state: dict, model, method, stages: list, scaler, env: Distributed) -> Progress:
    """Put model, method, grad scaler and RNGs back as they were saved; the Progress to continue from."""
    t = state["training"]
    current = t.get("stage", 0)
    for stage in stages[1:current + 1]:
        method.enter_stage(stage, model)  # the same modules and frozen parts as when it was saved
    model.to(env.device)
    model.load_state_dict(t.get("model_state", state["state_dict"]))
    scaler.load_state_dict(t["scaler"])
    if method.aux is not None:
        method.aux.load_state_dict(t["aux"])
    set_rng_state(t["rng"][env.rank] if env.rank < len(t["rng"]) else t["rng"][0])
    return Progress(state["epoch"], current, t["best_acc"], t["best_epoch"], t["optimizer"], t["scheduler"])


def training_state(progress: Progress, model, method, optimizer, scheduler, scaler, rng: list) -> dict:
    """What --resume needs beyond the exported weights (saved in the last checkpoint only)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "stage": progress.stage,
            "model_state": model.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
            "best_acc": progress.best_acc, "best_epoch": progress.best_epoch,
            "aux": method.aux.state_dict() if method.aux is not None else {}}


def epoch_payload(cfg, spec, data, method, model, metrics: dict | None, epoch: int) -> CheckpointPayload:
    """The exported part of the checkpoint after `epoch` (0-indexed)."""
    return CheckpointPayload(spec=spec, classes=list(data.classes), train_counts=list(data.train_counts),
                             state_dict=method.export_state(model), method=cfg.method, config=asdict(cfg),
                             metrics=metrics or {}, epoch=epoch + 1)
