"""Confidence-gated early exit: spend the later experts only on the images the earlier ones are unsure of.

The graph runs the experts in a fixed order (best first by accuracy on the calibration split). After
expert i it takes, for every image still active, the mean of the logits of experts 0..i; an image whose
confidence (max softmax of that mean) is strictly above the threshold of the class it is predicted as
leaves with that mean, the others (gathered into a sub-batch) go through expert i+1, and their results
are scattered back into the batch. Thresholds are per shot group of the predicted class (one value for
all groups is the global rule), so the images predicted as a few-shot class, the ones the first expert
knows least, can be held to a stricter threshold than the head's. Strictly above: threshold 1.0 never
exits (float softmax can reach exactly 1.0), so it is the full ensemble; threshold 0 always exits after
the first expert. Per-sample exit inside one batch composes with Triton's dynamic batching. A second
output, `experts_run` (INT64 [B, 1]), says how many experts each image went through.

`auto` chooses the order and the thresholds on the calibration split (export.labelled: disjoint from the
evaluation split, which only scores them): the cheapest setting (fewest experts per image) whose top-1
overall and on the tail classes (few-shot; medium-shot where the split has no few-shot class) stays
within the tolerance of the full ensemble by the one-sided lower confidence bound of the paired difference
(default 95%, each setting and group on its own, no correction for the search), not its point estimate: among
thousands of settings, the cheapest whose point estimate passes is mostly the luckiest on that split, and falls
short on the next images.

The graph is composed with the onnx API from per-expert graphs (FP32, or INT8 QDQ from
export.quantize): NonZero / Gather select the unsure rows, ScatterND writes them back.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from expertfuse.contract import EXPERTS_RUN, INPUT, LOGITS
from expertfuse.errors import UserError
from expertfuse.parity import compare, float32_error, require
from export.gate import expert_references, test_images
from export.job import ExportJob
from export.data_flags import LabelledData
from export.labelled import (GROUPS, EvalSet, accuracy_table, difference_lower_bounds, expert_logits, load_splits,
                             shot_accuracy, split_class_weights, splits_record)
from export.quantize import (Calibration, GraphWriter, Int8Settings, accuracy_gate, cpu_session, quantize_most_accurate,
                             run_logits, stamp_metadata, write_report)
from export.triton import publish
from serve.repository import ServingOptions, TensorSpec, staging
from train.data.longtail import shot_groups

AUTO_TOLERANCE_POINTS = 0.2
AUTO_CONFIDENCE = 0.95  # of each setting's one-sided lower bound, per group (no correction for the search)
AUTO_GRID = np.round(np.arange(0.0, 1.0, 0.01), 2).tolist() + [0.995, 0.999, 1.0]  # one global threshold
GROUP_GRID = [0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995,
              0.998, 0.999, 1.0]  # each shot group's threshold, searched jointly
SHOT_GROUPS = GROUPS[1:]  # many, medium, few: the groups an exit threshold is set for


@dataclass(frozen=True)
class ExitRule:
    """Exit thresholds per shot group of the class an image is predicted as; all equal: one global threshold."""
    many: float
    medium: float
    few: float

    @classmethod
    def parse(cls, text: str) -> "ExitRule":
        """'T' (every group) or 'MANY,MEDIUM,FEW', each in [0, 1]."""
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) not in (1, 3) or not all(0.0 <= v <= 1.0 for v in values):
            raise UserError(f"--early-exit takes a threshold in [0, 1], three of them (many,medium,few) or "
                            f"'auto[:TOLERANCE]', not {text!r}")
        return cls(*(values * 3 if len(values) == 1 else values))

    @property
    def is_global(self) -> bool:
        """One threshold for every shot group."""
        return self.many == self.medium == self.few

    def __str__(self) -> str:
        return f"{self.many:g}" if self.is_global else f"{self.many:g},{self.medium:g},{self.few:g}"

    def per_class(self, train_counts: list[int], shot_rule: str) -> np.ndarray:
        """The threshold of every class (float32 [C], as the graph holds it), by the class's shot group."""
        limit = np.empty(len(train_counts), dtype=np.float32)
        for group, classes in shot_groups(train_counts, shot_rule).items():
            limit[classes] = getattr(self, group)
        return limit


@dataclass(frozen=True)
class Auto:
    """--early-exit auto[:TOLERANCE[:CONFIDENCE]]: choose on the calibration split, within TOLERANCE points of the
    ensemble at CONFIDENCE (0.5: the point estimate)."""
    tolerance: float = AUTO_TOLERANCE_POINTS
    confidence: float = AUTO_CONFIDENCE

    def __str__(self) -> str:
        return f"auto:{self.tolerance:g}:{self.confidence:g}"


def parse_threshold(text: str) -> ExitRule | Auto:
    """argparse type: 'auto[:TOLERANCE[:CONFIDENCE]]', a threshold in [0, 1], or three (many,medium,few)."""
    if text == "auto" or text.startswith("auto:"):
        parts = text.split(":")[1:]
        try:
            tolerance = float(parts[0]) if parts else AUTO_TOLERANCE_POINTS
            confidence = float(parts[1]) if len(parts) > 1 else AUTO_CONFIDENCE
        except ValueError:
            tolerance = confidence = -1.0
        if len(parts) > 2 or not (0 <= tolerance < math.inf and 0.5 <= confidence < 1):
            raise UserError(f"--early-exit auto[:TOLERANCE[:CONFIDENCE]] takes points of top-1 (0 or more) and a "
                            f"confidence in [0.5, 1) (0.5: the point estimate), not {text!r}")
        return Auto(tolerance, confidence)
    return ExitRule.parse(text)


def add_early_exit_args(p) -> None:
    p.add_argument("--early-exit", type=parse_threshold, default=None,
                   metavar="THRESHOLD|MANY,MEDIUM,FEW|auto[:TOL[:CONF]]",
                   help="experts best first; an image leaves once max softmax of the mean so far exceeds the threshold "
                        "of its predicted class's shot group (auto: the cheapest setting within TOL points, default "
                        f"{AUTO_TOLERANCE_POINTS}, of the ensemble overall and on the tail at confidence CONF, default "
                        f"{AUTO_CONFIDENCE}, chosen on the calibration split)")


def expert_order(logits: np.ndarray, labels: np.ndarray, experts: tuple[int, ...]) -> list[int]:
    """The chosen experts, most accurate first (ties keep the checkpoint's order); pass the calibration split's
    logits, never the evaluation split's."""
    accuracy = {k: float((logits[:, k].argmax(1) == labels).mean()) for k in experts}
    return sorted(experts, key=lambda k: -accuracy[k])


def simulate(logits: np.ndarray, order: list[int], threshold: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the early-exit graph returns for per-expert logits [N, K, C] and a threshold (one, or one per class):
    (logits [N, C], experts run [N])."""
    limit = np.broadcast_to(np.asarray(threshold, dtype=np.float32), logits.shape[-1:])
    total = np.zeros_like(logits[:, 0], dtype=np.float64)
    out = np.empty_like(total)
    runs = np.zeros(len(logits), dtype=np.int64)
    active = np.ones(len(logits), dtype=bool)
    for i, k in enumerate(order):
        total[active] += logits[active, k]
        runs[active] = i + 1
        mean = total / (i + 1)
        out[active] = mean[active]
        shifted = np.exp(mean - mean.max(1, keepdims=True))
        confidence = (shifted / shifted.sum(1, keepdims=True)).max(1)
        active &= ~(confidence > limit[mean.argmax(1)])
    return out, runs


class Stages:
    """Confidence and predicted class after each expert of `order` (the mean so far) for every image: the same
    under any thresholds, so a whole grid of settings is scored without running simulate per setting."""

    def __init__(self, logits: np.ndarray, order: list[int], data: EvalSet):
        means = np.cumsum(logits[:, order].astype(np.float64), 1) / np.arange(1, len(order) + 1)[None, :, None]
        shifted = np.exp(means - means.max(-1, keepdims=True))
        self.confidence = (shifted / shifted.sum(-1, keepdims=True)).max(-1)  # [N, K]
        self.predicted = means.argmax(-1)  # [N, K]
        self.data = data
        self.full_hits = self.predicted[:, -1] == data.labels
        self.weights = split_class_weights(data)

    def score(self, rule: ExitRule, z: float | None = None) -> dict:
        """Top-1 by shot group and mean experts per image under `rule`, as simulate would give them; with `z`, also
        the lower bounds (z standard errors) of its difference from the full ensemble (points)."""
        limit = rule.per_class(self.data.train_counts, self.data.shot_rule)
        leaves = self.confidence[:, :-1] > limit[self.predicted[:, :-1]]
        stage = np.concatenate([leaves, np.ones((len(leaves), 1), bool)], 1).argmax(1)
        predicted = self.predicted[np.arange(len(stage)), stage]
        scored = {"accuracy": shot_accuracy(predicted, self.data, self.weights),
                  "mean_experts": float(stage.mean() + 1)}
        if z is not None:
            scored["lower_bound"] = difference_lower_bounds(predicted == self.data.labels, self.full_hits, self.data, z,
                                                            self.weights)
        return scored


def tail_group(data: EvalSet) -> str | None:
    """The rarest shot group with images in the split: few-shot, or medium-shot where it has none (CIFAR-10-LT)."""
    return next((g for g in ("few", "medium") if g in split_class_weights(data)), None)


def candidate_rules(data: EvalSet) -> list[ExitRule]:
    """Every global threshold of AUTO_GRID, then every combination of GROUP_GRID over the shot groups the classes
    fall in (an empty group's threshold stays 1.0: it never applies)."""
    present = [g for g, classes in shot_groups(data.train_counts, data.shot_rule).items() if classes]
    rules = [ExitRule(t, t, t) for t in AUTO_GRID]
    for values in itertools.product(GROUP_GRID, repeat=len(present)):
        chosen = dict(zip(present, values))
        rules.append(ExitRule(*(chosen.get(g, 1.0) for g in SHOT_GROUPS)))
    return list(dict.fromkeys(rules))


def choose_exit(logits: np.ndarray, data: EvalSet, order: list[int], tolerance: float = AUTO_TOLERANCE_POINTS,
                confidence: float = AUTO_CONFIDENCE) -> tuple[ExitRule, dict]:
    """On the calibration split: the cheapest rule (fewest experts per image; then the more accurate) whose top-1
    stays within `tolerance` points of the full ensemble overall and on the tail group, at `confidence` (the
    one-sided lower bound of the paired difference; 0.5: its point estimate). Returns it and the record of the
    choice: the full ensemble, the chosen rule, the cheapest global threshold that qualifies, why, and the
    global-threshold curve."""
    tail, stages, z = tail_group(data), Stages(logits, order, data), NormalDist().inv_cdf(confidence)
    full = shot_accuracy(stages.predicted[:, -1], data)  # the very predictions the bounds compare with

    def qualifies(lower: dict) -> bool:
        return lower["overall"] >= -tolerance and (tail is None or lower[tail] >= -tolerance)
    rows = [{"rule": rule, **stages.score(rule, z)} for rule in candidate_rules(data)]
    for row in rows:
        row["ok"] = qualifies(row["lower_bound"])
    cost = lambda r: (r["mean_experts"], -r["accuracy"]["overall"], -(r["accuracy"][tail] if tail else 0))  # noqa: E731
    chosen = min((r for r in rows if r["ok"]), key=cost)  # threshold 1.0 is the full ensemble: always there
    best_global = min((r for r in rows if r["ok"] and r["rule"].is_global), key=cost)
    bound = chosen["lower_bound"]
    why = (f"the cheapest of {len(rows)} settings (one global threshold, or one per shot group of the predicted "
           f"class) within {tolerance:g} points of the full ensemble by the {100 * confidence:g}% lower bound on the "
           f"{data.source}, overall ({chosen['accuracy']['overall']:.2f} vs {full['overall']:.2f}, lower bound of "
           f"the difference {bound['overall']:+.2f})"
           + (f" and on {tail}-shot classes ({chosen['accuracy'][tail]:.2f} vs {full[tail]:.2f}, lower bound "
              f"{bound[tail]:+.2f})" if tail else "")
           + f": {chosen['mean_experts']:.3f} experts per image; the cheapest global threshold within it, "
             f"{best_global['rule']}, runs {best_global['mean_experts']:.3f}")
    record = {"tolerance_points": tolerance, "confidence": confidence, "tail_group": tail, "full_ensemble": full,
              "settings_scanned": len(rows),
              "chosen": row_record(chosen), "cheapest_global": row_record(best_global), "why": why,
              "global_curve": [row_record(r) for r in rows if r["rule"].is_global]}
    return chosen["rule"], record


def row_record(row: dict) -> dict:
    """A scanned setting as the report keeps it."""
    return {"threshold": str(row["rule"]), "calibration": row["accuracy"], "calibration_mean_experts": row["mean_experts"],
            "calibration_lower_bound": row["lower_bound"], "ok": row["ok"]}


def _inline(model: onnx.ModelProto, prefix: str, image: str, logits: str) -> onnx.GraphProto:
    """The expert's graph with every name prefixed, reading `image` and writing `logits`."""
    graph = onnx.compose.add_prefix(model, prefix).graph
    rename = {graph.input[0].name: image, graph.output[0].name: logits}
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    return graph


def _stage(i: int) -> list[onnx.NodeProto]:
    """After i experts: the still-active rows whose confidence is not above their predicted class's threshold,
    gathered for expert i."""
    p, prev = f"s{i}_", f"s{i - 1}_"
    return [
        helper.make_node("Div", [prev + "sum", f"count{i}"], [p + "mean"]),
        helper.make_node("Softmax", [p + "mean"], [p + "prob"], axis=1),
        helper.make_node("ReduceMax", [p + "prob", "axis1"], [p + "confidence"], keepdims=0),
        helper.make_node("ArgMax", [p + "mean"], [p + "class"], axis=1, keepdims=0),
        helper.make_node("Gather", ["class_thresholds", p + "class"], [p + "threshold"], axis=0),
        helper.make_node("Greater", [p + "confidence", p + "threshold"], [p + "exits"]),
        helper.make_node("Not", [p + "exits"], [p + "stays"]),
        helper.make_node("NonZero", [p + "stays"], [p + "where"]),
        helper.make_node("Squeeze", [p + "where", "axis0"], [p + "pos"]),
        helper.make_node("Gather", [prev + "rows", p + "pos"], [p + "rows"], axis=0),
        helper.make_node("Gather", [INPUT, p + "rows"], [p + "image"], axis=0),
        helper.make_node("Gather", [prev + "sum", p + "pos"], [p + "kept_sum"], axis=0),
    ]


def _scatter(i: int) -> list[onnx.NodeProto]:
    """Add expert i's logits to the gathered sums and write the new means and counts back into the batch."""
    p, prev = f"s{i}_", f"s{i - 1}_"
    return [
        helper.make_node("Add", [p + "kept_sum", p + "logits"], [p + "sum"]),
        helper.make_node("Div", [p + "sum", f"count{i + 1}"], [p + "new_mean"]),
        helper.make_node("Unsqueeze", [p + "rows", "axis1"], [p + "index"]),
        helper.make_node("ScatterND", [prev + "out", p + "index", p + "new_mean"], [p + "out"]),
        helper.make_node("Shape", [p + "index"], [p + "index_shape"]),
        helper.make_node("ConstantOfShape", [p + "index_shape"], [p + "runs_update"],
                         value=numpy_helper.from_array(np.array([i + 1], dtype=np.int64))),
        helper.make_node("ScatterND", [prev + "runs", p + "index", p + "runs_update"], [p + "runs"]),
    ]


def compose(experts: list[onnx.ModelProto], threshold: float | np.ndarray) -> onnx.ModelProto:
    """One early-exit graph from per-expert graphs (image -> logits, same signature), in the order given, with one
    threshold or one per class."""
    first = experts[0]
    classes = first.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    limit = np.broadcast_to(np.asarray(threshold, dtype=np.float32), (classes,))
    consts = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
              numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
              numpy_helper.from_array(np.ascontiguousarray(limit), "class_thresholds")]
    consts += [numpy_helper.from_array(np.array(float(n), dtype=np.float32), f"count{n}") for n in range(1, len(experts) + 1)]
    nodes = [  # stage 0: every row runs the first expert
        helper.make_node("Shape", [INPUT], ["batch"], start=0, end=1),
        helper.make_node("Squeeze", ["batch"], ["batch_scalar"]),
        helper.make_node("Range", ["zero", "batch_scalar", "one"], ["s0_rows"]),
        helper.make_node("Concat", ["batch", "axis1"], ["runs_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["runs_shape"], ["s0_runs"],
                         value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("Identity", ["s0_sum"], ["s0_out"]),
    ]
    consts += [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
               numpy_helper.from_array(np.array(1, dtype=np.int64), "one")]
    graphs = [_inline(first, "e0_", INPUT, "s0_sum")]
    for i, model in enumerate(experts[1:], start=1):
        graphs.append(_inline(model, f"e{i}_", f"s{i}_image", f"s{i}_logits"))
    body = list(graphs[0].node) + nodes
    for i, graph in enumerate(graphs[1:], start=1):
        body += _stage(i) + list(graph.node) + _scatter(i)
    last = len(experts) - 1
    body += [helper.make_node("Identity", [f"s{last}_out"], [LOGITS]),
             helper.make_node("Identity", [f"s{last}_runs"], [EXPERTS_RUN])]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", classes]),
               helper.make_tensor_value_info(EXPERTS_RUN, TensorProto.INT64, ["batch", 1])]
    initializers = consts + [t for g in graphs for t in g.initializer]
    graph = helper.make_graph(body, "early_exit", [first.graph.input[0]], outputs, initializers)
    model = helper.make_model(graph, opset_imports=list(first.opset_import), ir_version=first.ir_version,
                              producer_name="expertfuse")
    onnx.checker.check_model(model, full_check=True)
    return model


def load_experts(paths: list[Path]) -> list[onnx.ModelProto]:
    models = [onnx.load(str(p)) for p in paths]
    if any(m.functions for m in models):
        raise UserError("an expert graph holds local functions; early exit composes plain graphs only")
    return models


def describe_threshold(logits: np.ndarray, data: EvalSet, order: list[int], rule: ExitRule) -> dict[str, dict]:
    """Accuracy (%) by shot group of the first expert, the early-exit graph and the full ensemble, and the
    early-exit graph's mean experts per image, on a labelled split."""
    out, runs = simulate(logits, order, rule.per_class(data.train_counts, data.shot_rule))
    score = lambda lg: shot_accuracy(lg.argmax(1), data)  # noqa: E731
    return {"first expert": score(logits[:, order[0]]), f"early exit > {rule}": score(out),
            "full ensemble": score(logits[:, order].mean(1)), "mean_experts": float(runs.mean())}


def score_on_evaluation(choice: dict, logits: np.ndarray, data: EvalSet, order: list[int]) -> None:
    """Add the evaluation split's accuracy and cost to every setting auto's record keeps, beside the calibration's:
    how far a choice made on one split holds on the other."""
    stages = Stages(logits, order, data)
    for row in [choice["chosen"], choice["cheapest_global"], *choice["global_curve"]]:
        scored = stages.score(ExitRule.parse(row["threshold"]))
        row.update(evaluation=scored["accuracy"], evaluation_mean_experts=scored["mean_experts"])
    choice["full_ensemble_evaluation"] = shot_accuracy(logits[:, order].mean(1).argmax(1), data)


def check_parity(session, job: ExportJob, order: list[int], threshold: float, images: dict[str, np.ndarray]) -> list[dict]:
    """ORT vs the float64 reference (the training network's experts, combined by `simulate`) on every image set,
    under the export gate (expertfuse.parity.EXPORT_FP32: held to PyTorch float32's own error, identical top-1);
    experts run reported."""
    rows, experts = [], tuple(range(job.model.num_experts))
    for kind, pixels in images.items():
        per_expert64, per_expert32 = expert_references(job, torch.from_numpy(pixels), experts, len(pixels))
        (ref, ref_runs), (ref32, _) = simulate(per_expert64, order, threshold), simulate(per_expert32, order, threshold)
        got, runs = session.run([LOGITS, EXPERTS_RUN], {INPUT: pixels})
        result = require(compare(got, ref, job.request.tolerance(), float32_error(ref32, ref)),
                         f"early-exit graph on {kind} images (batch {len(pixels)})")
        rows.append({"inputs": kind, "batch": len(pixels), **result.to_dict(),
                     "experts_run_agreement": float((runs[:, 0] == ref_runs).mean()), "mean_experts": float(runs.mean())})
        print(f"  parity {kind:>14} batch {len(pixels):>4}: {result.describe()}, experts run {runs.mean():.2f}/image")
    return rows


@dataclass
class EarlyExitPlan:
    """The experts' order and the exit rule (given, or chosen on the calibration split) of one early-exit export, and
    what they score on both splits."""
    calibration: EvalSet
    data: EvalSet  # the evaluation split: scores only
    logits: np.ndarray  # the PyTorch experts' logits on the evaluation split [N, K, C]
    order: list[int]
    rule: ExitRule
    choice: dict  # auto's record of the choice ({} when the rule was given)
    summary: dict

    @classmethod
    def make(cls, job: ExportJob, calibration: EvalSet, data: EvalSet, threshold: ExitRule | Auto) -> "EarlyExitPlan":
        chosen_on = expert_logits(job.model, calibration.pixels)
        order = expert_order(chosen_on, calibration.labels, job.opts.experts)
        rule, choice = choose_exit(chosen_on, calibration, order, threshold.tolerance, threshold.confidence) \
            if isinstance(threshold, Auto) else (threshold, {})
        logits = expert_logits(job.model, data.pixels)
        if choice:
            score_on_evaluation(choice, logits, data, order)
            print(f"early exit auto: {rule}, {choice['why']}")
        summary = {"calibration": describe_threshold(chosen_on, calibration, order, rule),
                   "evaluation": describe_threshold(logits, data, order, rule)}
        for split, name in ((calibration, "calibration"), (data, "evaluation")):
            print(f"early exit: experts in order {order}, threshold {rule} ({'auto' if choice else 'given'}), "
                  f"{summary[name]['mean_experts']:.2f} experts per image on the {split.source} (top-1 %):\n"
                  + accuracy_table({k: v for k, v in summary[name].items() if k != "mean_experts"}))
        return cls(calibration, data, logits, order, rule, choice, summary)

    @property
    def thresholds(self) -> np.ndarray:
        """The threshold of every class, as the graph holds it."""
        return self.rule.per_class(self.data.train_counts, self.data.shot_rule)

    def report(self) -> dict:
        return {"threshold": str(self.rule), "class_thresholds": self.thresholds.tolist(), "order": self.order,
                "splits": splits_record(self.calibration, self.data), "auto": self.choice, "labelled": self.summary}

    def metadata_extra(self) -> dict[str, str]:
        return {"early_exit_threshold": str(self.rule), "early_exit_order": ",".join(map(str, self.order)),
                "early_exit_class_thresholds": ",".join(f"{t:g}" for t in self.thresholds),
                "early_exit_mean_experts": f"{self.summary['evaluation']['mean_experts']:.3f}",
                "early_exit_chosen_on": self.calibration.source}


def check_early_exit(job: ExportJob) -> None:
    """What early exit serves, checked once the experts are known and before any work."""
    if job.opts.probs or job.opts.expert_logits or job.opts.fp16 or len(job.opts.experts) < 2:
        raise UserError("--early-exit needs two or more experts and serves logits + experts_run only "
                        "(no --probs, --expert-logits or --fp16)")


def expert_graphs(job: ExportJob, order: list[int], write_graph: GraphWriter, work: Path,
                  calibration: Calibration | None, int8: Int8Settings | None) -> tuple[list[Path], dict]:
    """Each expert as its own graph (image -> logits), FP32 or (with --int8) quantized and calibrated."""
    paths, choices = [], {}
    for k in order:
        path = write_graph(replace(job, opts=replace(job.opts, experts=(k,), fusion="loop")), "loop", work / f"expert{k}")
        if int8 is not None:
            path, choices[k] = quantize_most_accurate(path, calibration, int8)
        paths.append(path)
    return paths, choices


def export_early_exit(job: ExportJob, threshold: ExitRule | Auto, int8: Int8Settings | None, labelled: LabelledData,
                      serving: ServingOptions, write_graph: GraphWriter) -> Path:
    """Order the experts and choose the thresholds on the calibration split, compose the graph, check it (parity,
    or the INT8 gate on the evaluation split), and only then publish it."""
    check_early_exit(job)
    calibration = Calibration.load(job, int8, labelled) if int8 else None
    splits = (calibration.choice, calibration.data) if calibration else load_splits(job.checkpoint.data, job.spec, labelled)
    plan = EarlyExitPlan.make(job, *splits, threshold)
    data = plan.data
    with staging(job.request.out) as work:
        paths, choices = expert_graphs(job, plan.order, write_graph, work, calibration, int8)
        model_file = work / "model.onnx"
        onnx.save(compose(load_experts(paths), plan.thresholds), str(model_file))
        report = {"early_exit": plan.report(), "checkpoint": str(job.request.ckpt)}
        extra = plan.metadata_extra()
        if int8:
            ref, _ = simulate(plan.logits, plan.order, plan.thresholds)
            got = run_logits(cpu_session(model_file), data.inputs(job.opts.input_layout))
            gate = accuracy_gate(calibration.accuracy(ref), calibration.accuracy(got), int8, what="INT8 early exit",
                                 splits=calibration.splits)
            report.update(precision="int8", gate=gate.to_dict(), int8_choices=choices)
            extra.update(gate.metadata_extra())
        else:
            images = {f"random b{b}": test_images(job, b)["random"].numpy() for b in sorted({1, 2, 7, job.request.max_batch})}
            images["real-looking"] = test_images(job, job.request.max_batch)["real-looking"].numpy()
            images["labelled"] = data.inputs(job.opts.input_layout)[:256]
            report["parity"] = check_parity(cpu_session(model_file), job, plan.order, plan.thresholds, images)
        meta = job.metadata("early-exit", "int8" if int8 else "fp32", extra)
        stamp_metadata(model_file, meta)
        artifacts = {"model.onnx": model_file, "export_report.json": write_report(work, report)}
        return publish(job, "onnxruntime_onnx", serving, artifacts, "early-exit", meta,
                       [TensorSpec(EXPERTS_RUN, "INT64", [1])])[0]
