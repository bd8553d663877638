"""Confidence-gated early exit: spend the later experts only on the images the earlier ones are unsure of.

The graph runs the experts in a fixed order (best first by evaluation accuracy). After expert i it
takes, for every image still active, the mean of the logits of experts 0..i; an image whose
confidence (max softmax of that mean) is strictly above the threshold leaves with that mean, the
others (gathered into a sub-batch) go through expert i+1, and their results are scattered back into
the batch. Strictly above: threshold 1.0 never exits (float softmax can reach exactly 1.0), so it is the
full ensemble; threshold 0 always exits after the first expert. Per-sample exit inside one batch
composes with Triton's dynamic batching. A second output, `experts_run` (INT64 [B, 1]), says how many
experts each image went through.

The graph is composed with the onnx API from per-expert graphs (FP32, or INT8 QDQ from
export.quantize): NonZero / Gather select the unsure rows, ScatterND writes them back.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from expertfuse.contract import INPUT, LOGITS
from expertfuse.errors import UserError
from expertfuse.parity import compare, float32_error, require
from export.gate import expert_references, test_images
from export.job import ExportJob
from export.labelled import EvalSet, LabelledData, accuracy_table, expert_logits, load_eval_set, shot_accuracy
from export.quantize import (Calibration, GraphWriter, Int8Settings, accuracy_gate, cpu_session, quantize_most_accurate,
                             run_logits, stamp_metadata, write_report)
from export.triton import publish
from serve.repository import ServingOptions, TensorSpec, staging

EXPERTS_RUN = "experts_run"
AUTO_TOLERANCE_POINTS = 0.2
AUTO_GRID = np.round(np.arange(0.0, 1.0, 0.01), 2).tolist() + [0.995, 0.999, 1.0]


def parse_threshold(text: str) -> float | str:
    """argparse type: a threshold in [0, 1] or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--early-exit takes a threshold in [0, 1] or 'auto', not {text!r}")
    return value


def add_early_exit_args(p) -> None:
    p.add_argument("--early-exit", type=parse_threshold, default=None, metavar="THRESHOLD|auto",
                   help="experts best first; an image leaves once max softmax of the mean so far exceeds THRESHOLD "
                        f"(auto: the lowest within {AUTO_TOLERANCE_POINTS} points of the ensemble, overall and few-shot)")


def expert_order(logits: np.ndarray, labels: np.ndarray, experts: tuple[int, ...]) -> list[int]:
    """The chosen experts, most accurate first (ties keep the checkpoint's order)."""
    accuracy = {k: float((logits[:, k].argmax(1) == labels).mean()) for k in experts}
    return sorted(experts, key=lambda k: -accuracy[k])


def simulate(logits: np.ndarray, order: list[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What the early-exit graph returns for per-expert logits [N, K, C]: (logits [N, C], experts run [N])."""
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
        active &= ~(confidence > threshold)
    return out, runs


def choose_threshold(logits: np.ndarray, data: EvalSet, order: list[int],
                     tolerance: float = AUTO_TOLERANCE_POINTS) -> tuple[float, list[dict]]:
    """The lowest threshold whose accuracy stays within `tolerance` points of the full ensemble overall and
    on few-shot classes (where the split has any). Returns it and the scanned grid."""
    full = shot_accuracy(logits[:, order].mean(1).argmax(1), data)
    rows = []
    for threshold in AUTO_GRID:
        out, runs = simulate(logits, order, threshold)
        acc = shot_accuracy(out.argmax(1), data)
        few_ok = acc["few"] != acc["few"] or acc["few"] >= full["few"] - tolerance
        rows.append({"threshold": threshold, "accuracy": acc, "mean_experts": float(runs.mean()),
                     "ok": acc["overall"] >= full["overall"] - tolerance and few_ok})
    chosen = next(r["threshold"] for r in rows if r["ok"])  # 1.0 is the full ensemble, always ok
    return chosen, rows


def _inline(model: onnx.ModelProto, prefix: str, image: str, logits: str) -> onnx.GraphProto:
    """The expert's graph with every name prefixed, reading `image` and writing `logits`."""
    graph = onnx.compose.add_prefix(model, prefix).graph
    rename = {graph.input[0].name: image, graph.output[0].name: logits}
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    return graph


def _stage(i: int, threshold: float) -> list[onnx.NodeProto]:
    """After i experts: the still-active rows whose confidence is not above the threshold, gathered for expert i."""
    p, prev = f"s{i}_", f"s{i - 1}_"
    return [
        helper.make_node("Div", [prev + "sum", f"count{i}"], [p + "mean"]),
        helper.make_node("Softmax", [p + "mean"], [p + "prob"], axis=1),
        helper.make_node("ReduceMax", [p + "prob", "axis1"], [p + "confidence"], keepdims=0),
        helper.make_node("Greater", [p + "confidence", "threshold"], [p + "exits"]),
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


def compose(experts: list[onnx.ModelProto], threshold: float) -> onnx.ModelProto:
    """One early-exit graph from per-expert graphs (image -> logits, same signature), in the order given."""
    first = experts[0]
    consts = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
              numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
              numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold")]
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
        body += _stage(i, threshold) + list(graph.node) + _scatter(i)
    last = len(experts) - 1
    body += [helper.make_node("Identity", [f"s{last}_out"], [LOGITS]),
             helper.make_node("Identity", [f"s{last}_runs"], [EXPERTS_RUN])]
    classes = first.graph.output[0].type.tensor_type.shape.dim[1].dim_value
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


def describe_threshold(logits: np.ndarray, data: EvalSet, order: list[int], threshold: float) -> dict[str, dict]:
    """Accuracy (%) by shot group of the first expert, the early-exit graph and the full ensemble, and the
    early-exit graph's mean experts per image, on the labelled set."""
    out, runs = simulate(logits, order, threshold)
    score = lambda lg: shot_accuracy(lg.argmax(1), data)
    return {"first expert": score(logits[:, order[0]]), f"early exit > {threshold:g}": score(out),
            "full ensemble": score(logits[:, order].mean(1)), "mean_experts": float(runs.mean())}


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
    """The labelled set, the experts' order and the threshold (given or chosen) of one early-exit export."""
    data: EvalSet
    order: list[int]
    threshold: float
    grid: list[dict]
    summary: dict

    @classmethod
    def make(cls, job: ExportJob, data: EvalSet, threshold: float | str) -> "EarlyExitPlan":
        logits = expert_logits(job.model, data.pixels)
        order = expert_order(logits, data.labels, job.opts.experts)
        threshold, grid = choose_threshold(logits, data, order) if threshold == "auto" else (threshold, [])
        summary = describe_threshold(logits, data, order, threshold)
        print(f"early exit: experts in order {order}, threshold {threshold:g} ({'auto' if grid else 'given'}), "
              f"{summary['mean_experts']:.2f} experts per image on {data.source} (top-1 %):\n"
              + accuracy_table({k: v for k, v in summary.items() if k != "mean_experts"}))
        return cls(data, order, threshold, grid, summary)

    def metadata_extra(self) -> dict[str, str]:
        return {"early_exit_threshold": f"{self.threshold:g}", "early_exit_order": ",".join(map(str, self.order)),
                "early_exit_mean_experts": f"{self.summary['mean_experts']:.3f}"}


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


def export_early_exit(job: ExportJob, threshold: float | str, int8: Int8Settings | None, labelled: LabelledData,
                      serving: ServingOptions, write_graph: GraphWriter) -> Path:
    """Order the experts, choose the threshold, compose the graph, check it (parity, or the INT8 gate), and only
    then publish it."""
    check_early_exit(job)
    calibration = Calibration.load(job, int8, labelled) if int8 else None
    data = calibration.data if calibration else load_eval_set(job.checkpoint.data, job.spec, labelled)
    plan = EarlyExitPlan.make(job, data, threshold)
    with staging(job.request.out) as work:
        paths, choices = expert_graphs(job, plan.order, write_graph, work, calibration, int8)
        model_file = work / "model.onnx"
        onnx.save(compose(load_experts(paths), plan.threshold), str(model_file))
        report = {"early_exit": {"threshold": plan.threshold, "order": plan.order, "auto_grid": plan.grid,
                                 "labelled": plan.summary}, "checkpoint": str(job.request.ckpt)}
        extra = plan.metadata_extra()
        if int8:
            ref, _ = simulate(expert_logits(job.model, data.pixels), plan.order, plan.threshold)
            got = run_logits(cpu_session(model_file), data.inputs(job.opts.input_layout))
            gate = accuracy_gate(calibration.accuracy(ref), calibration.accuracy(got), int8, what="INT8 early exit")
            report.update(precision="int8", gate=gate.to_dict(), int8_choices=choices)
            extra.update(gate.metadata_extra())
        else:
            images = {f"random b{b}": test_images(job, b)["random"].numpy() for b in sorted({1, 2, 7, job.request.max_batch})}
            images["real-looking"] = test_images(job, job.request.max_batch)["real-looking"].numpy()
            images["labelled"] = data.inputs(job.opts.input_layout)[:256]
            report["parity"] = check_parity(cpu_session(model_file), job, plan.order, plan.threshold, images)
        meta = job.metadata("early-exit", "int8" if int8 else "fp32", extra)
        stamp_metadata(model_file, meta)
        artifacts = {"model.onnx": model_file, "export_report.json": write_report(work, report)}
        return publish(job, "onnxruntime_onnx", serving, artifacts, "early-exit", meta,
                       [TensorSpec(EXPERTS_RUN, "INT64", [1])])[0]
