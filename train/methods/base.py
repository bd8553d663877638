"""What a training method is: a loss over per-expert logits, plus optional training-only modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.schedule import Stage, main_stage


class Method:
    """Base class. Subclasses set `name`, may set `views` (augmented views per image) and `aux`
    (an nn.Module of training-only parts: trained and checkpointed for resume, never exported)."""

    name = ""
    views = 1
    # What export serves by default, and so what the training log's "served" column evaluates: the mean logits of
    # these experts (None: all of them, the ensemble).
    served_experts: tuple[int, ...] | None = None
    served_label = "ensemble"

    @staticmethod
    def adapt_spec(fields: dict) -> dict:
        """The method's say on the model spec built from the configuration (most keep it as it is)."""
        return fields

    def __init__(self, cfg, model: nn.Module, train_counts: list[int]):
        self.cfg = cfg
        self.aux: nn.Module | None = None
        self.log_counts = torch.log(torch.tensor(train_counts, dtype=torch.float32).clamp_min(1))

    def to(self, device: torch.device) -> "Method":
        self.log_counts = self.log_counts.to(device)
        if self.aux is not None:
            self.aux.to(device)
        return self

    def loss(self, model: nn.Module, images, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(scalar loss, per-expert logits [B, K, C] for training accuracy, named loss parts)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (EMA updates and the like)."""

    def stages(self) -> list[Stage]:
        """Training stages in order; most methods have one."""
        return [main_stage(self.cfg)]

    def enter_stage(self, stage: Stage, model: nn.Module) -> None:
        """Called when a later stage begins (and on resume into it): replace or freeze parts here."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode for an epoch (a stage may keep some parts in eval mode)."""
        model.train()

    def sampler(self, stage: Stage, targets: list[int], generator: torch.Generator, rank: int, world: int):
        """A stage's own training sampler (None: shuffle every image once per epoch)."""
        return None

    def export_state(self, model: nn.Module) -> dict:
        """The state_dict export reads (a method may fold training-only parts into it)."""
        return model.state_dict()

    def selection_metric(self, metrics: dict) -> float:
        """What 'best' means when keeping <method>_best.pt: the ensemble's overall accuracy."""
        return metrics["ensemble"]["overall"]


def balanced_logits(logits: torch.Tensor, log_counts: torch.Tensor) -> torch.Tensor:
    """Balanced softmax: logits + log n_c (so CE on them equals CE plus the log prior)."""
    return logits + log_counts


def per_expert_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [B, K, C] logits, summed over experts."""
    return sum(F.cross_entropy(logits[:, k], targets) for k in range(logits.shape[1]))
