"""Baseline: plain (or balanced-softmax) cross-entropy on every expert independently."""
from __future__ import annotations

from train.methods.base import Method, balanced_logits, per_expert_ce


class CrossEntropy(Method):
    name = "ce"

    def loss(self, model, images, targets):
        logits = model(images)
        train_logits = balanced_logits(logits, self.log_counts) if self.cfg.balanced_softmax else logits
        loss = per_expert_ce(train_logits, targets)
        return loss, logits, {"ce": loss.detach()}
