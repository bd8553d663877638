"""The long-tail profile: per-class counts, which images are kept, and shot groups.

Class 0 is the head class. CIFAR-100 with n_max=500 gives 10,847 / 12,608 / 19,573 images at
imbalance factors 100 / 50 / 10.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from expertfuse.errors import UserError

PROFILES = ("exp", "step")
SUBSET_MODES = ("shuffle", "first")
SHOT_RULES = ("strict", "ncl")


def longtail_counts(n_max: int, num_classes: int, imb_factor: float, profile: str = "exp") -> list[int]:
    """Per-class training counts: exponential n_c = floor(n_max * IF^(-c/(C-1))), or a two-step profile
    (the first half of the classes keep n_max, the rest n_max / IF)."""
    if imb_factor < 1:
        raise UserError(f"imbalance factor must be >= 1, got {imb_factor}")
    if profile == "exp":
        return [int(math.floor(n_max * imb_factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        return [n_max if c < head else int(n_max / imb_factor) for c in range(num_classes)]
    raise UserError(f"unknown long-tail profile {profile!r}; choose from {', '.join(PROFILES)}")


def select_longtail(targets: Sequence[int], counts: Sequence[int], mode: str = "shuffle", seed: int = 0) -> list[int]:
    """Indices of the kept images: per class, the first n_c in dataset order (SHIKE, `first`) or the
    first n_c after shuffling that class's indices with NumPy seed 0 (LDAM/RIDE, `shuffle`)."""
    if mode not in SUBSET_MODES:
        raise UserError(f"unknown subset mode {mode!r}; choose from {', '.join(SUBSET_MODES)}")
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if len(idx) < n:
            raise UserError(f"class {c} has {len(idx)} images, the profile asks for {n}")
        if mode == "shuffle":
            rng.shuffle(idx)
        kept.extend(idx[:n].tolist())
    return kept


def shot_groups(train_counts: Sequence[int], rule: str = "strict") -> dict[str, list[int]]:
    """Classes per group from training counts. strict (OLTR, default): many > 100, few < 20;
    ncl: many >= 100, few <= 20."""
    if rule not in SHOT_RULES:
        raise UserError(f"unknown shot rule {rule!r}; choose from {', '.join(SHOT_RULES)}")
    many, medium, few = [], [], []
    for c, n in enumerate(train_counts):
        is_many = n >= 100 if rule == "ncl" else n > 100
        is_few = n <= 20 if rule == "ncl" else n < 20
        (many if is_many else few if is_few else medium).append(c)
    return {"many": many, "medium": medium, "few": few}


GROUPS = ("overall", "many", "medium", "few")


def group_accuracy(correct: np.ndarray, total: np.ndarray, train_counts: Sequence[int], rule: str = "strict",
                   weights: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Overall and many/medium/few accuracy (%) from per-class correct/total counts.

    strict averages per-class accuracies within a group (OLTR); ncl is sample-weighted like NCL's code. A class
    without an image in the split (a held-out calibration split has none of the head class) does not count.
    `weights`: class_weights of the same split and rule, for a caller scoring many predictions of one split.
    """
    per_class = np.divide(correct, total, out=np.zeros(len(total)), where=total > 0)
    weights = class_weights(total, train_counts, rule) if weights is None else weights
    return {name: 100.0 * float(weights[name] @ per_class) if name in weights else float("nan") for name in GROUPS}


def class_weights(total: np.ndarray, train_counts: Sequence[int], rule: str = "strict") -> dict[str, np.ndarray]:
    """Per group (overall, many, medium, few), the weight of each class's own accuracy in that group's top-1: by
    images overall and under the ncl rule, equally per class under the strict rule; classes without an image in
    the split (`total`: images per class) weigh nothing, and a group without any is absent."""
    total = np.asarray(total, dtype=np.float64)
    weights = {"overall": total / max(total.sum(), 1)}
    for name, classes in shot_groups(train_counts, rule).items():
        classes = [c for c in classes if total[c] > 0]
        if classes:
            weights[name] = np.zeros(len(total))
            weights[name][classes] = total[classes] / total[classes].sum() if rule == "ncl" else 1 / len(classes)
    return weights
