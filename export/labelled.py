"""Labelled images for the accuracy-aware exports: INT8 calibration and gate, early-exit threshold.

Images are read through the training data flags (train.data.datasets.build_data), by default the
checkpoint's own dataset and evaluation split (synthetic data is rebuilt from the checkpoint's
config), preprocessed exactly as a served model receives them (expertfuse.preprocess), and scored
overall and per shot group with the training code's own rule.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import numpy as np
import torch

from expertfuse.errors import UserError
from expertfuse.preprocess import pixel_transform, to_model_input
from train.data.datasets import DataBundle, DataOptions, LabeledView, build_data
from train.data.longtail import group_accuracy


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The training data flags (default: the checkpoint's), plus how many evaluation images to use."""
    group = p.add_argument_group("labelled data (INT8 calibration and gate, early-exit threshold)")
    for f in fields(DataOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action="store_true", default=None, help="as in python -m train")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            group.add_argument(flag, type=kind, default=None, help="as in python -m train (default: the checkpoint's)")
    group.add_argument("--shot-rule", default=None, help="shot groups: strict | ncl (default: the checkpoint's)")
    group.add_argument("--eval-images", type=int, default=0, help="cap on evaluation images, class-balanced (0: all)")


@dataclass
class LabelledSet:
    pixels: torch.Tensor  # uint8 [N, 3, H, W], as a served model receives them before its layout
    labels: np.ndarray  # int64 [N]
    train_counts: list[int]
    shot_rule: str

    def inputs(self, layout: str) -> np.ndarray:
        return to_model_input(self.pixels, layout)


def data_options(checkpoint: dict, args: argparse.Namespace) -> DataOptions:
    """The checkpoint's training data options, overridden by the flags given."""
    config = checkpoint.get("config") or {}
    values = {f.name: config[f.name] for f in fields(DataOptions) if f.name in config}
    values.update({f.name: getattr(args, f.name) for f in fields(DataOptions) if getattr(args, f.name, None) is not None})
    return DataOptions(**values)


def balanced_indices(targets: list[int], count: int, seed: int) -> np.ndarray:
    """`count` indices spread evenly over the classes (a class with fewer images is repeated), so the
    tail classes weigh as much as the head in calibration ranges and in a capped evaluation."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    classes = np.unique(targets)
    per_class = int(np.ceil(count / len(classes)))
    picked = []
    for c in classes:
        members = np.flatnonzero(targets == c)
        picked.append(rng.choice(members, per_class, replace=per_class > len(members)))
    order = np.concatenate(picked)
    return rng.permutation(order)[:count] if len(order) > count else order


def read_pixels(view: LabeledView, indices, resize: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 [N, 3, size, size] and labels of the chosen items, preprocessed like a served request."""
    to_pixels = pixel_transform(resize, size)
    images = [to_pixels(view.base[view.indices[i]][0]) for i in indices]
    return torch.stack(images), np.asarray([view.targets[i] for i in indices], dtype=np.int64)


def load_bundle(checkpoint: dict, args: argparse.Namespace) -> DataBundle:
    bundle = build_data(data_options(checkpoint, args))
    if len(bundle.classes) != len(checkpoint["classes"]):
        raise UserError(f"the labelled data has {len(bundle.classes)} classes, the checkpoint "
                        f"{len(checkpoint['classes'])}; pass the training data flags it was trained with")
    return bundle


def evaluation_set(bundle: DataBundle, checkpoint: dict, spec, args: argparse.Namespace) -> LabelledSet:
    """The labelled evaluation split (capped class-balanced by --eval-images)."""
    view = bundle.test
    count = getattr(args, "eval_images", 0) or 0
    indices = balanced_indices(view.targets, count, seed=1) if 0 < count < len(view) else range(len(view))
    pixels, labels = read_pixels(view, indices, spec.resize, spec.input_size)
    rule = getattr(args, "shot_rule", None) or (checkpoint.get("config") or {}).get("shot_rule", "strict")
    return LabelledSet(pixels, labels, list(bundle.train_counts), rule)


def calibration_pixels(bundle: DataBundle, spec, count: int, seed: int = 0) -> torch.Tensor:
    """`count` training images, class-balanced, uint8 [N, 3, H, W]."""
    if count < 1:
        raise UserError("--calib-images must be at least 1")
    return read_pixels(bundle.train, balanced_indices(bundle.train.targets, count, seed), spec.resize, spec.input_size)[0]


def shot_accuracy(predictions: np.ndarray, labels: np.ndarray, train_counts: list[int], rule: str) -> dict[str, float]:
    """Top-1 (%) overall and many/medium/few from predicted class indices."""
    classes = len(train_counts)
    total = np.bincount(labels, minlength=classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=classes).astype(np.float64)
    return group_accuracy(correct, total, train_counts, rule)


def accuracy_table(rows: dict[str, dict[str, float]]) -> str:
    """A per-shot-group table, one row per variant."""
    groups = ("overall", "many", "medium", "few")
    lines = [f"  {'variant':<28}" + "".join(f"{g:>9}" for g in groups)]
    for name, acc in rows.items():
        lines.append(f"  {name:<28}" + "".join(f"{acc[g]:>9.2f}" if acc[g] == acc[g] else f"{'-':>9}" for g in groups))
    return "\n".join(lines)
