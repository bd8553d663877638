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


def collapsed(acc: dict) -> bool:
    """An expert that has given up on most classes: right on fewer than half of them."""
    return sum(a > 0 for a in acc["per_class"]) < len(acc["per_class"]) / 2
