"""Training stages and their learning-rate schedules (per-epoch multipliers of the stage's peak LR).

- multistep (NCL): linear warmup from 1/3 over `warmup_epochs`, x0.1 at each milestone; evaluated at
  the 1-indexed epoch like the official WarmupMultiStepLR, so the first epoch runs at 0.467;
- cosine (NCL ImageNet): cosine from the peak to eta_min over the stage, also 1-indexed;
- warmup-cosine (SHIKE): 0-indexed, linear from `warmup_start` to 1 over `warmup_epochs`, then a
  cosine to 0 at the end of the stage (SHIKE stage 1: 0.025 ... 0.125, then 0.15 * cosine). With 0 warmup
  epochs it is MoCo's and SSD's lr * (1 + cos(pi * e / E)) / 2: the first epoch at the peak, none at 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertfuse.errors import UserError

SCHEDULES = ("multistep", "cosine", "warmup-cosine")


@dataclass
class Stage:
    name: str
    epochs: int
    lr: float
    schedule: str = "multistep"
    warmup_epochs: int = 0
    warmup_start: float = 1.0 / 3
    milestones: list[int] = field(default_factory=list)
    eta_min: float = 0.0
    batch_size: int = 0  # 0: the configured batch size


def lr_factor(stage: Stage, epoch: int) -> float:
    """LR multiplier for the 0-indexed `epoch` inside `stage`."""
    if stage.schedule == "warmup-cosine":
        w = stage.warmup_epochs
        if epoch < w:
            return stage.warmup_start + (1 - stage.warmup_start) * epoch / w
        return 0.5 * (1 + math.cos(math.pi * (epoch - w) / max(stage.epochs - w, 1)))
    e = epoch + 1
    w = stage.warmup_epochs
    warm = stage.warmup_start * (1 - e / w) + e / w if e < w else 1.0
    if stage.schedule == "multistep":
        return warm * 0.1 ** sum(m <= e for m in stage.milestones)
    if stage.schedule == "cosine":
        eta = stage.eta_min / stage.lr
        return warm * (eta + (1 - eta) * 0.5 * (1 + math.cos(math.pi * e / stage.epochs)))
    raise UserError(f"unknown schedule {stage.schedule!r}; choose from {', '.join(SCHEDULES)}")


def main_stage(cfg) -> Stage:
    """The first (often only) stage, from the training configuration."""
    return Stage("main", cfg.epochs, cfg.lr, cfg.schedule, cfg.warmup_epochs, cfg.warmup_start,
                 list(cfg.milestones), cfg.eta_min)
