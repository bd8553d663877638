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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.methods.base import Method, balanced_logits


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


def _projection(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))


def _gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class MocoBranch(nn.Module):
    """NCL's contrastive branch: per-expert query projection, EMA key encoder + key projection, queue.

    Official quirks (each behind a flag, on by default): the key encoder starts from its own random
    init instead of a copy of the query encoder; the key projection is never updated; the EMA step
    runs before backward. Shuffle-BN for the keys is not reproduced.
    """

    def __init__(self, model, dim: int, queue_size: int, temperature: float, momentum: float,
                 independent_key_init: bool, frozen_key_projection: bool):
        super().__init__()
        feat_dim = model.experts[0].backbone.out_dim
        k = model.num_experts
        self.temperature, self.momentum = temperature, momentum
        self.frozen_key_projection = frozen_key_projection
        self.query_projection = nn.ModuleList(_projection(feat_dim, dim) for _ in range(k))
        self.key_encoder = type(model)(model.spec) if independent_key_init else copy.deepcopy(model)
        self.key_projection = nn.ModuleList(_projection(feat_dim, dim) for _ in range(k)) if frozen_key_projection \
            else copy.deepcopy(self.query_projection)
        self.key_encoder.requires_grad_(False)
        self.key_projection.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(k, queue_size, dim), dim=2))
        self.register_buffer("queue_ptr", torch.zeros(k, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, model) -> None:
        pairs = [(self.key_encoder, model)]
        if not self.frozen_key_projection:
            pairs.append((self.key_projection, self.query_projection))
        for key, query in pairs:
            for pk, pq in zip(key.parameters(), query.parameters()):
                pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)

    def loss(self, query_features: torch.Tensor, key_images: torch.Tensor) -> torch.Tensor:
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
            self._enqueue(k, _gather(key))
        return total

    @torch.no_grad()
    def _enqueue(self, k: int, keys: torch.Tensor) -> None:
        size = self.queue.shape[1]
        ptr = int(self.queue_ptr[k])
        index = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[k, index] = keys.to(self.queue.dtype)
        self.queue_ptr[k] = (ptr + len(keys)) % size


class NCL(Method):
    name = "ncl"

    def __init__(self, cfg, model, train_counts):
        super().__init__(cfg, model, train_counts)
        if cfg.ncl_moco:
            self.views = 2
            self.aux = MocoBranch(model, cfg.moco_dim, cfg.moco_queue, cfg.moco_t, cfg.moco_momentum,
                                  cfg.moco_independent_key_init, cfg.moco_frozen_key_projection)

    def loss(self, model, images, targets):
        if self.aux is None:
            logits = model(images)
        else:
            query_images, key_images = images
            logits, features = model(query_images, with_features=True)
            if self.cfg.moco_ema_before_backward:
                self.aux.momentum_update(_unwrap(model))
        balanced = balanced_logits(logits, self.log_counts)
        mask = hcm_mask(logits[:, 0], targets, self.cfg.hcm_n)
        nil = nil_loss(balanced, mask, targets, self.cfg.ce_ratio, self.cfg.hcm_ratio)
        nbod = nbod_loss(balanced, mask, self.cfg.diversity_factor, self.cfg.diversity_factor_hcm)
        loss, parts = nil + nbod, {"nil": nil.detach(), "nbod": nbod.detach()}
        if self.aux is not None and self.cfg.con_ratio:
            con = self.aux.loss(features, key_images)
            loss = loss + self.cfg.con_ratio * con
            parts["con"] = con.detach()
        return loss, logits, parts

    def after_step(self, model) -> None:
        if self.aux is not None and not self.cfg.moco_ema_before_backward:
            self.aux.momentum_update(_unwrap(model))


def _unwrap(model):
    return getattr(model, "module", model)
