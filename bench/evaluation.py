"""Scoring a variant on the labelled evaluation set (export.labelled reads it): top-1 overall and per shot
group, per-class accuracy, and agreement with the PyTorch ensemble."""
from __future__ import annotations

import numpy as np

from bench.runners import Runner
from export.labelled import EvalSet, class_hits
from train.data.longtail import group_accuracy


def batched_logits(runner: Runner, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.logits(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def accuracy(logits: np.ndarray, data: EvalSet, reference_pred: np.ndarray) -> dict:
    """Top-1 overall and per shot group (%), per-class accuracy, and agreement (%) with the reference's predictions."""
    pred = np.asarray(logits).argmax(1)
    correct, total = class_hits(pred, data)
    groups = group_accuracy(correct, total, data.train_counts, data.shot_rule)
    per_class = np.divide(correct, total, out=np.zeros(len(total)), where=total > 0) * 100
    return {**groups, "per_class": [round(float(a), 2) for a in per_class],
            "agreement": float(100 * (pred == reference_pred).mean()),
            "classes_predicted": int(len(np.unique(pred)))}


def gain_interval(pred: np.ndarray, baseline_pred: np.ndarray, data: EvalSet, boot: int = 2000,
                  seed: int = 0) -> dict[str, dict]:
    """Accuracy of `pred` minus that of `baseline_pred` (points), overall and few-shot, with a 95% paired bootstrap
    interval: both are scored on the same resampled images, so a gain no larger than the evaluation set's noise
    shows as an interval that holds 0. (A best expert picked on this same set is biased upwards by that noise.)"""
    rng = np.random.default_rng(seed)
    labels, n = data.labels, len(data.labels)
    hits = [p == labels for p in (pred, baseline_pred)]

    def gain(idx: np.ndarray) -> tuple[float, float]:
        drawn = labels[idx]
        total = np.bincount(drawn, minlength=data.num_classes)
        acc = [group_accuracy(np.bincount(drawn, weights=h[idx], minlength=data.num_classes), total,
                              data.train_counts, data.shot_rule) for h in hits]
        return acc[0]["overall"] - acc[1]["overall"], acc[0]["few"] - acc[1]["few"]
    point = gain(np.arange(n))
    draws = np.array([gain(rng.integers(0, n, n)) for _ in range(boot)])
    return {name: {"points": point[i], "ci95": [float(v) for v in np.nanpercentile(draws[:, i], [2.5, 97.5])]
                   if not np.isnan(point[i]) else [float("nan")] * 2}
            for i, name in enumerate(("overall", "few"))}


def collapsed(acc: dict) -> bool:
    """An expert that has given up on most classes: right on fewer than half of them."""
    return sum(a > 0 for a in acc["per_class"]) < len(acc["per_class"]) / 2
