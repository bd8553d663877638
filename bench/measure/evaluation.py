"""Scoring a variant on the labelled evaluation set (export.labelled reads it): top-1 overall and per shot
group, per-class accuracy, and agreement with the PyTorch ensemble."""
from __future__ import annotations

import numpy as np

from bench.measure.runners import Runner
from export.labelled import EvalSet, class_hits, shot_accuracy
from train.data.longtail import group_accuracy


def batched_logits(runner: Runner, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.logits(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def accuracy(logits: np.ndarray, data: EvalSet, reference_pred: np.ndarray) -> dict:
    """Top-1 overall and per shot group (%) with the 95% interval of overall and few-shot, per-class accuracy, and
    agreement (%) with the reference's predictions."""
    pred = np.asarray(logits).argmax(1)
    correct, total = class_hits(pred, data)
    groups = group_accuracy(correct, total, data.train_counts, data.shot_rule)
    per_class = np.divide(correct, total, out=np.zeros(len(total)), where=total > 0) * 100
    return {**groups, "per_class": [round(float(a), 2) for a in per_class],
            "agreement": float(100 * (pred == reference_pred).mean()),
            "classes_predicted": int(len(np.unique(pred))), "ci95": accuracy_interval(pred, data)}


INTERVAL_GROUPS = ("overall", "few")


def resampled_accuracy(preds: list[np.ndarray], data: EvalSet, boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[boot, len(preds), 2]: top-1 overall and few-shot of each prediction, all scored on the same resampled
    images in each draw (the bootstrap over the evaluation set)."""
    rng = np.random.default_rng(seed)
    labels, n = data.labels, len(data.labels)
    hits = [p == labels for p in preds]

    def scores(idx: np.ndarray) -> list[list[float]]:
        drawn = labels[idx]
        total = np.bincount(drawn, minlength=data.num_classes)
        acc = [group_accuracy(np.bincount(drawn, weights=h[idx], minlength=data.num_classes), total,
                              data.train_counts, data.shot_rule) for h in hits]
        return [[a[g] for g in INTERVAL_GROUPS] for a in acc]
    return np.array([scores(rng.integers(0, n, n)) for _ in range(boot)])


def interval(draws: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of bootstrap draws (None when the group has no image: NaN throughout)."""
    return None if np.isnan(draws).all() else [float(v) for v in np.nanpercentile(draws, [2.5, 97.5])]


def accuracy_interval(pred: np.ndarray, data: EvalSet, boot: int = 1000) -> dict[str, list[float] | None]:
    """The 95% bootstrap interval (over the evaluation images) of top-1 overall and few-shot."""
    draws = resampled_accuracy([pred], data, boot)
    return {g: interval(draws[:, 0, i]) for i, g in enumerate(INTERVAL_GROUPS)}


def gain_interval(pred: np.ndarray, baseline_pred: np.ndarray, data: EvalSet, boot: int = 2000,
                  seed: int = 0) -> dict[str, dict]:
    """Accuracy of `pred` minus that of `baseline_pred` (points), overall and few-shot, with a 95% paired bootstrap
    interval: both are scored on the same resampled images, so a gain no larger than the evaluation set's noise
    shows as an interval that holds 0. (A best expert picked on this same set is biased upwards by that noise.)"""
    point = [shot_accuracy(p, data) for p in (pred, baseline_pred)]
    draws = resampled_accuracy([pred, baseline_pred], data, boot, seed)
    gains = draws[:, 0] - draws[:, 1]
    return {g: {"points": point[0][g] - point[1][g], "ci95": interval(gains[:, i]) or [float("nan")] * 2}
            for i, g in enumerate(INTERVAL_GROUPS)}


def collapsed(acc: dict) -> bool:
    """An expert that has given up on most classes: right on fewer than half of them."""
    return sum(a > 0 for a in acc["per_class"]) < len(acc["per_class"]) / 2
