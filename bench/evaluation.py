"""Accuracy on a labelled evaluation set, measured the way a served model sees images.

The default set is the checkpoint's own evaluation split, rebuilt from the data settings training
recorded; any dataset the training CLI reads can replace it with the same flags. Every image goes
through the served input path (uint8 pixels after the model's resize and center crop), and every
variant is scored the way training scores: top-1 overall, many/medium/few by the checkpoint's
training counts and shot rule, per-class accuracy, and agreement with the PyTorch ensemble.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import numpy as np
import torch

from bench.runners import Runner
from expertfuse.errors import UserError
from expertfuse.preprocess import normalize_pixels, pixel_transform
from train.config import TrainConfig
from train.data.datasets import DataOptions, build_data
from train.data.longtail import group_accuracy

DATA_FLAGS = [f.name for f in fields(DataOptions)]


@dataclass
class EvalSet:
    pixels: np.ndarray  # uint8 [N, H, W, 3], the served model's input
    labels: np.ndarray  # int64 [N]
    train_counts: list[int]
    shot_rule: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.train_counts)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The training CLI's data flags (same names and help), defaulting to what the checkpoint recorded."""
    group = p.add_argument_group("evaluation data (default: the checkpoint's own evaluation split)")
    help_of = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    for name in DATA_FLAGS:
        default = getattr(DataOptions(), name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of.get(name))
        else:
            group.add_argument(flag, type=type(default), default=None, help=help_of.get(name))
    group.add_argument("--eval-limit", type=int, default=0, help="evaluate on at most this many images, every class "
                       "kept (0: all)")


def data_options(checkpoint: dict, args: argparse.Namespace) -> DataOptions:
    """The checkpoint's recorded data settings, overridden by the flags given on the command line."""
    recorded = checkpoint.get("config") or {}
    values = {name: recorded[name] for name in DATA_FLAGS if name in recorded}
    values.update({name: getattr(args, name) for name in DATA_FLAGS if getattr(args, name, None) is not None})
    return DataOptions(**values)


def spread(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` samples taken evenly from every class (a class-ordered set stays balanced)."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    return np.sort(order[np.linspace(0, len(order) - 1, limit).round().astype(int)])


def load_eval_set(checkpoint: dict, spec, args: argparse.Namespace) -> EvalSet:
    """The labelled images as the served model receives them, with the checkpoint's shot groups."""
    opts = data_options(checkpoint, args)
    bundle = build_data(opts)
    counts = list(checkpoint.get("train_counts") or bundle.train_counts)
    if len(bundle.classes) != spec.num_classes:
        raise UserError(f"evaluation set {opts.dataset} has {len(bundle.classes)} classes; the checkpoint has "
                        f"{spec.num_classes}")
    labels = np.asarray(bundle.test.targets, dtype=np.int64)
    keep = spread(labels, getattr(args, "eval_limit", 0))
    transform = pixel_transform(spec.resize, spec.input_size)
    pixels = np.stack([transform(bundle.test[int(i)][0]).permute(1, 2, 0).numpy() for i in keep])
    rule = (checkpoint.get("config") or {}).get("shot_rule", "strict")
    return EvalSet(pixels, labels[keep], counts, rule, f"{opts.dataset} evaluation split, {len(keep)} images")


def batched_logits(runner: Runner, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.logits(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def expert_logits(model, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Every expert's FP32 logits [N, K, C] from the training network: the PyTorch reference of every variant."""
    spec, out = model.eval().spec, []
    for i in range(0, len(pixels), batch):
        x = normalize_pixels(torch.from_numpy(pixels[i:i + batch]), spec.mean, spec.std, "uint8-nhwc")
        out.append(model(x).numpy())
    return np.concatenate(out)


def accuracy(logits: np.ndarray, data: EvalSet, reference_pred: np.ndarray) -> dict:
    """Top-1 overall and per shot group (%), per-class accuracy, and agreement (%) with the reference's predictions."""
    pred = np.asarray(logits).argmax(1)
    total = np.bincount(data.labels, minlength=data.num_classes)
    correct = np.bincount(data.labels[pred == data.labels], minlength=data.num_classes)
    groups = group_accuracy(correct, total, data.train_counts, data.shot_rule)
    per_class = np.divide(correct, total, out=np.zeros(len(total)), where=total > 0) * 100
    return {**groups, "per_class": [round(float(a), 2) for a in per_class],
            "agreement": float(100 * (pred == reference_pred).mean()),
            "classes_predicted": int(len(np.unique(pred)))}


def collapsed(acc: dict) -> bool:
    """An expert that has given up on most classes: right on fewer than half of them."""
    return sum(a > 0 for a in acc["per_class"]) < len(acc["per_class"]) / 2
