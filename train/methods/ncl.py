"""NCL: Nested Collaborative Learning (Li et al., CVPR 2022), as the official code computes it.

L = NIL + NBOD (+ con_ratio * sum_k InfoNCE_k with the MoCo branch on), over K separate experts:
- balanced logits z^_k = z_k + log n;
- HCM: top-N classes of expert 0's raw logits with the target forced in, one 0/1 mask shared by all
  experts; partial logits multiply by the mask (non-hard classes become 0, not -inf);
- NIL = sum_k CE(z^_k) * ce_ratio + CE(z^_k * m) * hcm_ratio;
- NBOD = lambda/(K-1) sum_k sum_{j!=k} KL(p_j || p_k) on full and on partial distributions,
  log p = log(softmax + 1e-9), batchmean, no stop-gradient.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from train.methods.base import Method, balanced_logits
from train.methods.parts import FeatureQueue, ema_update, projection_mlp, unwrap


def hcm_mask(expert0_logits: torch.Tensor, targets: torch.Tensor, hard_n: int) -> torch.Tensor:
    """0/1 mask [B, C] of the `hard_n` hardest categories by expert 0's logits, the target always kept."""
    scores = expert0_logits.detach().clone()
    scores.scatter_(1, targets[:, None], float("inf"))
    top = scores.topk(min(hard_n, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores).scatter_(1, top, 1.0)


def nil_loss(balanced: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
             ce_ratio: float = 1.0, hcm_ratio: float = 1.0) -> torch.Tensor:
    loss = balanced.new_zeros(())
    for k in range(balanced.shape[1]):
        loss = loss + ce_ratio * F.cross_entropy(balanced[:, k], targets)
        loss = loss + hcm_ratio * F.cross_entropy(balanced[:, k] * mask, targets)
    return loss


def pairwise_kl(logits: torch.Tensor) -> torch.Tensor:
    """sum over ordered pairs j != k of KL(p_j || p_k), batchmean, for [B, K, C] logits.

    Both logs are log(p + 1e-9), as in the official code. Neither side is detached, so F.kl_div's
    xlogy(p_j, p_j) would give an infinite gradient wherever p_j underflows to 0; this form stays finite.
    """
    probs = logits.softmax(dim=2)
    log_probs = torch.log(probs + 1e-9)
    total = logits.new_zeros(())
    for k in range(logits.shape[1]):
        for j in range(logits.shape[1]):
            if j != k:
                total = total + (probs[:, j] * (log_probs[:, j] - log_probs[:, k])).sum(1).mean()
    return total


def nbod_loss(balanced: torch.Tensor, mask: torch.Tensor, factor: float = 0.6, factor_hcm: float = 0.6) -> torch.Tensor:
    experts = balanced.shape[1]
    if experts < 2:
        return balanced.new_zeros(())
    return (factor * pairwise_kl(balanced) + factor_hcm * pairwise_kl(balanced * mask[:, None])) / (experts - 1)


class MocoBranch(FeatureQueue):
    """NCL's contrastive branch: one key queue per expert (the buffers of FeatureQueue), a query projection per
    expert, an EMA key encoder and key projections.

    As the official code: the EMA update runs inside its per-expert loop over the whole encoder list, so it is
    applied once per expert per step (momentum ** K; --moco-ema-once applies it once), in the loss after the
    step's keys were computed (--no-moco-ema-before-backward: after the optimizer step instead). Official
    quirks (flags, on by default): the key encoder starts from its own random init instead of a copy of the
    query encoder; the key projection is never updated. Shuffle-BN for the keys is not reproduced.
    """

    def __init__(self, model, cfg):
        experts = model.num_experts
        super().__init__(experts, cfg.moco_queue, cfg.moco_dim)
        feat_dim = model.experts[0].backbone.out_dim
        self.temperature = cfg.moco_t
        self.momentum = cfg.moco_momentum if cfg.moco_ema_once else cfg.moco_momentum ** experts
        self.ema_before_backward = cfg.moco_ema_before_backward
        self.frozen_key_projection = cfg.moco_frozen_key_projection
        self.query_projection = nn.ModuleList(projection_mlp(feat_dim, cfg.moco_dim) for _ in range(experts))
        self.key_encoder = type(model)(model.spec) if cfg.moco_independent_key_init else copy.deepcopy(model)
        self.key_projection = nn.ModuleList(projection_mlp(feat_dim, cfg.moco_dim) for _ in range(experts)) \
            if self.frozen_key_projection else copy.deepcopy(self.query_projection)
        self.key_encoder.requires_grad_(False)
        self.key_projection.requires_grad_(False)

    def momentum_update(self, model) -> None:
        ema_update(self.key_encoder, model, self.momentum)
        if not self.frozen_key_projection:
            ema_update(self.key_projection, self.query_projection, self.momentum)

    def ema_step(self, model, optimizer_stepped: bool) -> None:
        """The EMA update at its configured moment: in the loss (official) or after the optimizer step."""
        if optimizer_stepped != self.ema_before_backward:
            self.momentum_update(unwrap(model))

    def loss(self, query_features: torch.Tensor, key_images: torch.Tensor) -> torch.Tensor:
        """InfoNCE summed over experts; each expert's keys then enter its queue."""
        with torch.no_grad():
            key_features = self.key_encoder.forward_features(key_images)
        total = query_features.new_zeros(())
        for k in range(query_features.shape[1]):
            q = F.normalize(self.query_projection[k](query_features[:, k]), dim=1)
            with torch.no_grad():
                key = F.normalize(self.key_projection[k](key_features[:, k]), dim=1)
            positive = (q * key).sum(dim=1, keepdim=True)
            negative = q @ self.queue[k].T.clone()
            logits = torch.cat([positive, negative], dim=1) / self.temperature
            total = total + F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
            self.enqueue(k, key)
        return total


class NCL(Method):
    name = "ncl"

    def __init__(self, cfg, model, train_counts):
        super().__init__(cfg, model, train_counts)
        if cfg.ncl_moco:
            self.views = 2
            self.aux = MocoBranch(model, cfg)

    def loss(self, model, images, targets):
        if self.aux is None:
            logits = model(images)
        else:
            query_images, key_images = images
            logits, features = model(query_images, with_features=True)
        balanced = balanced_logits(logits, self.log_counts)
        mask = hcm_mask(logits[:, 0], targets, self.cfg.hcm_n)
        nil = nil_loss(balanced, mask, targets, self.cfg.ce_ratio, self.cfg.hcm_ratio)
        nbod = nbod_loss(balanced, mask, self.cfg.diversity_factor, self.cfg.diversity_factor_hcm)
        loss, parts = nil + nbod, {"nil": nil.detach(), "nbod": nbod.detach()}
        if self.aux is not None and self.cfg.con_ratio:
            con = self.aux.loss(features, key_images)
            loss = loss + self.cfg.con_ratio * con
            parts["con"] = con.detach()
        if self.aux is not None:
            self.aux.ema_step(model, optimizer_stepped=False)
        return loss, logits, parts

    def after_step(self, model) -> None:
        if self.aux is not None:
            self.aux.ema_step(model, optimizer_stepped=True)
