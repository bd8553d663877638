"""SHIKE: Self-Heterogeneous Integration with Knowledge Excavation (Jin et al., CVPR 2023), as the official code.

Stage 1 (DKT), summed over experts e:  CE(z_e, y) + w * KL(q || p~_e) + sum_{j != e} KL(p_j || p_e)
  - teacher of non-target knowledge: t_c = max_e z_{e,c}; the hardest negative h = argmax_{c != y} mean_e z_{e,c}
    takes the mean instead of the max (hardest-negative suppression); t_y = 0; q = softmax(t);
  - students p~_e = softmax(z_e with the target logit forced to -s) (s = the normed heads' scale, 30);
  - both KLs with F.kl_div's reduction 'mean' (divided by B*C), nothing detached; w = 10.
Stage 2 (cRT): fresh normed heads, everything else frozen, balanced softmax CE (logits + log n) per expert.
The frozen trunk's BatchNorm statistics keep updating, as the official code does (--crt-bn-update).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from expertfuse.errors import UserError
from train.methods.base import Method, balanced_logits, per_expert_ce
from train.methods.parts import freeze_batchnorm, unwrap
from train.models.heads import build_head
from train.schedule import Stage, main_stage


def dkt_teacher(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher logits [B, C] from per-expert logits [B, K, C]."""
    onehot = F.one_hot(targets, logits.shape[2]).bool()
    mean, best = logits.mean(1), logits.max(1).values
    hardest = mean.masked_fill(onehot, float("-inf")).argmax(1, keepdim=True)
    teacher = best.scatter(1, hardest, mean.gather(1, hardest))
    return teacher.masked_fill(onehot, 0.0)


def dkt_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float, weight: float = 10.0) -> dict[str, torch.Tensor]:
    """The three stage-1 terms, each summed over experts (total = ce + weight * hns + md)."""
    onehot = F.one_hot(targets, logits.shape[2]).to(logits.dtype)
    teacher = dkt_teacher(logits, targets).softmax(1)
    experts = logits.shape[1]
    ce = per_expert_ce(logits, targets)
    hns = logits.new_zeros(())
    md = logits.new_zeros(())
    with warnings.catch_warnings():  # 'mean' (divide by B*C) is what the official code uses
        warnings.simplefilter("ignore")
        for e in range(experts):
            student = logits[:, e] * (1 - onehot) - scale * onehot
            hns = hns + F.kl_div(student.log_softmax(1), teacher, reduction="mean")
            for j in range(experts):
                if j != e:
                    md = md + F.kl_div(logits[:, e].log_softmax(1), logits[:, j].softmax(1), reduction="mean")
    return {"ce": ce, "hns": hns, "md": md, "total": ce + weight * hns + md}


class SHIKE(Method):
    name = "shike"

    def __init__(self, cfg, model, train_counts):
        super().__init__(cfg, model, train_counts)
        if model.spec.head != "normed":
            raise UserError("shike needs normed heads (--head normed --head-scale 30); use --preset shike-cifar100-lt")
        self.stage = "main"

    def stages(self) -> list[Stage]:
        """DKT, then cRT with the official warmup (0.375 -> 1 over a quarter of the stage: 5 of 20 epochs)."""
        epochs = self.cfg.crt_epochs
        crt = [Stage("crt", epochs, self.cfg.crt_lr, "warmup-cosine", min(5, epochs // 4), 0.375)] if epochs else []
        return [main_stage(self.cfg), *crt]

    def enter_stage(self, stage: Stage, model) -> None:
        """cRT: fresh normed heads on every expert; all other parameters frozen."""
        self.stage = stage.name
        device = next(model.parameters()).device
        model.requires_grad_(False)
        for expert in model.experts:
            expert.head = build_head(model.spec, expert.head.weight.shape[1]).to(device)

    def train_mode(self, model) -> None:
        model.train()
        if self.stage == "crt" and not self.cfg.crt_bn_update:
            freeze_batchnorm(model)

    def loss(self, model, images, targets):
        logits = model(images)
        if self.stage == "crt":
            loss = per_expert_ce(balanced_logits(logits, self.log_counts), targets)
            return loss, logits, {"crt_ce": loss.detach()}
        parts = dkt_loss(logits, targets, model_spec(model).head_scale, self.cfg.dkt_weight)
        return parts["total"], logits, {k: v.detach() for k, v in parts.items() if k != "total"}


def model_spec(model):
    return unwrap(model).spec
