"""The labelled sets, measured the way a served model sees images: the evaluation split, which only scores
(bench's accuracy, the INT8 gate), and the calibration split, disjoint from it, on which every choice is made
(early-exit thresholds and expert order, INT8 calibration images and reduce range, bench's best single expert):
a choice made on the scored images would be scored above its true accuracy.

The default sets are the checkpoint's own, rebuilt from the data settings training recorded (the calibration
split per dataset: train.data.datasets.build_calibration); any dataset the training CLI reads can replace them
with the same flags. Every image goes
through the served input path (uint8 pixels after the model's resize and center crop) and is scored
the way training scores: top-1 overall and many/medium/few by the checkpoint's training counts and
shot rule (train.data.longtail.group_accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expertfuse.errors import UserError
from expertfuse.preprocess import graph_input, normalize_pixels, served_pixels
from export.data_flags import DATA_FLAGS, LabelledData
from train.data.datasets import DataBundle, LabeledView, build_calibration, build_data
from train.data.options import DataOptions
from train.data.longtail import GROUPS, class_weights, group_accuracy


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

    def inputs(self, layout: str) -> np.ndarray:
        return graph_input(self.pixels, layout)


def data_options(checkpoint: dict, request: LabelledData) -> DataOptions:
    """The checkpoint's recorded data settings, overridden by the flags given on the command line."""
    recorded = checkpoint.get("config") or {}
    values = {name: recorded[name] for name in DATA_FLAGS if name in recorded}
    return DataOptions(**{**values, **request.overrides})


def spread(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` samples taken evenly from every class (a class-ordered set stays balanced)."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    return np.sort(order[np.linspace(0, len(order) - 1, limit).round().astype(int)])


def load_data(checkpoint: dict, spec, request: LabelledData) -> DataBundle:
    """The training and evaluation images of the checkpoint's dataset (or the one the flags name)."""
    opts = data_options(checkpoint, request)
    bundle = build_data(opts)
    if len(bundle.classes) != spec.num_classes:
        raise UserError(f"labelled data {opts.dataset} has {len(bundle.classes)} classes; the checkpoint has "
                        f"{spec.num_classes} (pass the training data flags it was trained with)")
    return bundle


def read_pixels(view: LabeledView, indices, spec) -> np.ndarray:
    """uint8 [N, H, W, 3] of the chosen items, preprocessed like a served request."""
    return np.stack([served_pixels(view[int(i)][0], spec.resize, spec.input_size) for i in indices])


def labelled_view(checkpoint: dict, spec, request: LabelledData, bundle: DataBundle, view, name: str) -> EvalSet:
    """`request.limit` images of a labelled dataset view (spread over the classes) as the served model receives
    them, with the checkpoint's shot groups; `name` says which split it is."""
    labels = np.asarray(view.targets, dtype=np.int64)
    keep = spread(labels, request.limit)
    rule = (checkpoint.get("config") or {}).get("shot_rule", "strict")
    counts = list(checkpoint.get("train_counts") or bundle.train_counts)
    return EvalSet(read_pixels(view, keep, spec), labels[keep], counts, rule,
                   f"{data_options(checkpoint, request).dataset} {name}, {len(keep)} images")


def load_eval_set(checkpoint: dict, spec, request: LabelledData, bundle: DataBundle | None = None) -> EvalSet:
    """The evaluation split: where accuracy is scored."""
    bundle = bundle or load_data(checkpoint, spec, request)
    return labelled_view(checkpoint, spec, request, bundle, bundle.test, f"evaluation split ({bundle.test_name})")


def load_calibration_set(checkpoint: dict, spec, request: LabelledData, bundle: DataBundle | None = None) -> EvalSet:
    """The calibration split (disjoint from the evaluation split): where choices are made."""
    bundle = bundle or load_data(checkpoint, spec, request)
    view, what = build_calibration(data_options(checkpoint, request), bundle, request.calib_split,
                                   request.calib_per_class)
    return labelled_view(checkpoint, spec, request, bundle, view, f"calibration split ({what})")


def load_splits(checkpoint: dict, spec, request: LabelledData) -> tuple[EvalSet, EvalSet]:
    """(calibration, evaluation): the split that chooses and the split that scores, from one read of the data."""
    bundle = load_data(checkpoint, spec, request)
    return load_calibration_set(checkpoint, spec, request, bundle), load_eval_set(checkpoint, spec, request, bundle)


def splits_record(calibration: EvalSet, evaluation: EvalSet) -> dict[str, str]:
    """What every report says about its data: the split that chose and the split that scored."""
    return {"chosen_on": calibration.source, "scored_on": evaluation.source}


def calibration_pixels(data: EvalSet, count: int, seed: int = 0) -> np.ndarray:
    """`count` images of the calibration split spread evenly over the classes (a class's images repeat when it has
    fewer), uint8 [N, H, W, 3]: the tail classes weigh as much as the head in the activation ranges INT8 measures."""
    rng = np.random.default_rng(seed)
    per_class = int(np.ceil(count / data.num_classes))
    picked = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), per_class,
                                        replace=per_class > int((data.labels == c).sum()))
                             for c in np.unique(data.labels)])
    return data.pixels[rng.permutation(picked)[:count]]


@torch.no_grad()
def expert_logits(model, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Every expert's FP32 logits [N, K, C] from the training network: the PyTorch reference of every variant."""
    spec, out = model.eval().spec, []
    for i in range(0, len(pixels), batch):
        x = normalize_pixels(torch.from_numpy(pixels[i:i + batch]), spec.mean, spec.std, "uint8-nhwc")
        out.append(model(x).numpy())
    return np.concatenate(out)


def class_hits(predictions: np.ndarray, data: EvalSet) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) per class."""
    total = np.bincount(data.labels, minlength=data.num_classes)
    correct = np.bincount(data.labels[predictions == data.labels], minlength=data.num_classes)
    return correct, total


def shot_accuracy(predictions: np.ndarray, data: EvalSet,
                  weights: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Top-1 (%) overall and many/medium/few from predicted class indices (`weights`: split_class_weights(data),
    when the caller has them)."""
    return group_accuracy(*class_hits(predictions, data), data.train_counts, data.shot_rule, weights)


def split_class_weights(data: EvalSet) -> dict[str, np.ndarray]:
    """train.data.longtail.class_weights of this split: how its top-1 of each group weighs each class."""
    return class_weights(np.bincount(data.labels, minlength=data.num_classes), data.train_counts, data.shot_rule)


def difference_lower_bounds(hits: np.ndarray, baseline_hits: np.ndarray, data: EvalSet, z: float,
                            weights: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """One-sided lower confidence bounds (points) of top-1 of `hits` minus top-1 of `baseline_hits` (per image,
    both on `data`), overall and per shot group: the paired difference's class means, weighed as the group's top-1
    weighs its classes (split_class_weights), minus z standard errors. Normal approximation, the spread pooled over
    the group's classes, so that a class where the two happened to agree on every image does not count as certain;
    a group of one image per class has no spread to pool and, where the two differ at all, takes the largest a
    difference of hits can have (1).
    Closed form, so that a search can bound thousands of settings; like any normal approximation it is too narrow
    when a group's disagreements number in the single digits."""
    labels, classes = data.labels, data.num_classes
    diff = hits.astype(np.float64) - baseline_hits
    count = np.bincount(labels, minlength=classes)
    mean = np.bincount(labels, weights=diff, minlength=classes) / np.maximum(count, 1)
    spread = np.bincount(labels, weights=diff * diff, minlength=classes) - count * mean ** 2  # sum of squares
    bounds = {}
    for name, w in (weights if weights is not None else split_class_weights(data)).items():
        members = w > 0
        freedom = int((count[members] - 1).sum())
        pooled = max(float(spread[members].sum()), 0.0) / freedom if freedom else float(mean[members].any())
        standard_error = np.sqrt(pooled * float((w[members] ** 2 / count[members]).sum()))
        bounds[name] = float(100 * (w @ mean - z * standard_error))
    return bounds


def accuracy_table(rows: dict[str, dict[str, float]]) -> str:
    """A per-shot-group table (top-1 %), one row per variant."""
    lines = [f"  {'variant':<28}" + "".join(f"{g:>9}" for g in GROUPS)]
    for name, acc in rows.items():
        lines.append(f"  {name:<28}" + "".join(f"{acc[g]:>9.2f}" if acc[g] == acc[g] else f"{'-':>9}" for g in GROUPS))
    return "\n".join(lines)
