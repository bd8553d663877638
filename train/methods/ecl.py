"""ECL: "Towards Effective Collaborative Learning in Long-Tailed Recognition" (Xu et al., TMM 2023; arXiv 2305.03378).

No public code exists and only the abstract is available, so this is a documented INTERPRETATION on the
NCL chassis (K separate experts, balanced-softmax CE, online distillation between experts). The abstract
names three components; each is here behind a flag so it can be ablated:

(i) re-weighted distillation (--ecl-reweight): every expert has two heads on the same features: the label
    head (supervised by labels with balanced softmax; the head that is served) and a distillation head
    (training only, supervised by online distillation from the other experts alone). Comparing their
    predictions tells, per class, how much knowledge distillation carries: r_c = EMA of the label head's
    true-class probability / EMA of the distillation head's, over samples of class c. The class-weight
    vector w = C * r / sum(r) (mean 1) multiplies each sample's expert-to-expert distillation loss
    KL(mean_{j!=e} p_j || p_e) on the label heads, so classes where peers transfer little (assumed: the
    tail) get more of it. Assumptions: EMA momentum 0.9, teacher = mean of the other experts' balanced
    probabilities, detached; temperature 1.
(ii) feature-level distillation (--ecl-feature-weight): each expert's L2-normalised pooled feature is pulled
    toward the (detached) mean of the other experts' (squared error, batch mean). Assumption: pooled features.
(iii) contrastive proxy task (--ecl-contrastive): NCL's per-expert MoCo branch (InfoNCE, queue, EMA keys).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertfuse.errors import UserError
from train.methods.base import Method, balanced_logits, per_expert_ce
from train.methods.ncl import MocoBranch


def peer_mean(x: torch.Tensor) -> torch.Tensor:
    """For [B, K, ...]: element k is the mean over the other experts j != k (detached: a teacher)."""
    k = x.shape[1]
    return ((x.sum(1, keepdim=True) - x) / (k - 1)).detach()


def class_weights(label_conf: torch.Tensor, distill_conf: torch.Tensor) -> torch.Tensor:
    """w = C * r / sum(r) with r_c = label-head confidence / distillation-head confidence on class c."""
    ratio = label_conf / distill_conf.clamp_min(1e-6)
    return ratio * len(ratio) / ratio.sum()


def feature_distillation(features: torch.Tensor) -> torch.Tensor:
    """sum over experts of the batch-mean squared distance to the other experts' mean normalised feature."""
    normed = F.normalize(features, dim=2)
    return ((normed - peer_mean(normed)) ** 2).sum(2).mean(0).sum()


def weighted_peer_kl(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over experts of mean_i w_i * KL(mean_{j!=e} p_j || p_e) on [B, K, C] logits."""
    log_p = logits.log_softmax(2)
    teacher = peer_mean(log_p.exp())
    kl = (teacher * (torch.log(teacher + 1e-9) - log_p)).sum(2)  # [B, K]
    return (kl * weights[:, None]).mean(0).sum()


class ECLAux(nn.Module):
    """Training-only parts: the distillation heads, the per-class confidence EMAs, the contrastive branch."""

    def __init__(self, model, num_classes: int, cfg):
        super().__init__()
        dim = model.experts[0].backbone.out_dim
        self.distill_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(model.num_experts))
        self.register_buffer("label_conf", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("distill_conf", torch.full((num_classes,), 1.0 / num_classes))
        self.moco = MocoBranch(model, cfg) if cfg.ecl_contrastive else None

    @torch.no_grad()
    def update_confidence(self, label_probs: torch.Tensor, distill_probs: torch.Tensor, targets: torch.Tensor,
                          momentum: float = 0.9) -> None:
        """EMA per class of the true-class probability (averaged over experts) of each head type."""
        for buffer, probs in ((self.label_conf, label_probs), (self.distill_conf, distill_probs)):
            true = probs.mean(1).gather(1, targets[:, None]).squeeze(1)
            classes = targets.unique()
            means = torch.stack([true[targets == c].mean() for c in classes])
            buffer[classes] = momentum * buffer[classes] + (1 - momentum) * means.to(buffer.dtype)


class ECL(Method):
    name = "ecl"

    def __init__(self, cfg, model, train_counts):
        super().__init__(cfg, model, train_counts)
        if model.num_experts < 2:
            raise UserError("ecl distils between experts: it needs --num-experts >= 2")
        self.aux = ECLAux(model, model.spec.num_classes, cfg)
        self.views = 2 if cfg.ecl_contrastive else 1

    def loss(self, model, images, targets):
        query = images[0] if self.views == 2 else images
        logits, features = model(query, with_features=True)
        balanced = balanced_logits(logits, self.log_counts)
        ce = per_expert_ce(balanced, targets)
        distill_logits = torch.stack([h(features[:, k]) for k, h in enumerate(self.aux.distill_heads)], dim=1)
        distill_balanced = balanced_logits(distill_logits, self.log_counts)
        # the distillation heads learn only from the other experts' (detached) label-head predictions
        teacher = peer_mean(balanced.softmax(2))
        head_kd = (teacher * (torch.log(teacher + 1e-9) - distill_balanced.log_softmax(2))).sum(2).mean(0).sum()
        weights = torch.ones_like(targets, dtype=logits.dtype)
        if self.cfg.ecl_reweight:
            self.aux.update_confidence(balanced.softmax(2).detach(), distill_balanced.softmax(2).detach(), targets)
            weights = class_weights(self.aux.label_conf, self.aux.distill_conf)[targets].to(logits.dtype)
        kd = weighted_peer_kl(balanced, weights)
        loss = ce + head_kd + self.cfg.ecl_kd_weight * kd
        parts = {"ce": ce.detach(), "head_kd": head_kd.detach(), "kd": kd.detach()}
        if self.cfg.ecl_feature_weight:
            feat = feature_distillation(features)
            loss = loss + self.cfg.ecl_feature_weight * feat
            parts["feature_kd"] = feat.detach()
        if self.aux.moco is not None:
            con = self.aux.moco.loss(features, images[1])
            loss = loss + self.cfg.con_ratio * con
            parts["con"] = con.detach()
            self.aux.moco.ema_step(model, optimizer_stepped=False)
        return loss, logits, parts

    def after_step(self, model) -> None:
        if self.aux.moco is not None:
            self.aux.moco.ema_step(model, optimizer_stepped=True)
