"""Cost and accuracy of the cheap variants, in-process on ONNX Runtime CPU (what bench's cost-accuracy report calls).

  python -m export.costs --ckpt runs/ncl/ncl.pt --out bench/results/cheap-cpu [--batches 1,64] [--budget-s 20]

Variants: FP32 single (the best expert), FP32 ensemble (loop), INT8 single, INT8 ensemble, early-exit
ensemble (FP32 and INT8, threshold from --early-exit, auto by default). Accuracy overall and per shot
group on the labelled evaluation set; cost as the latency ratio to the FP32 single expert, measured
interleaved (expertfuse.timing.interleave + ratio, 95% bootstrap interval) at each batch size.
Writes cheap.json, cheap.md and cheap.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from expertfuse.cli import int_list, run_cli
from expertfuse.timing import interleave, ratio
from export.common import ExportJob, job_for
from export.early_exit import (add_early_exit_args, choose_threshold, compose, expert_logits, expert_order,
                               load_experts)
from export.labelled import LabelledSet, calibration_pixels, evaluation_set, load_bundle, shot_accuracy
from export.onnx import DEFAULT_OPSET, export_graph, onnx_file
from export.quantize import add_int8_args, cpu_session, quantize_most_accurate, run_logits
from expertfuse.preprocess import to_model_input

BASELINE = "fp32 single"


def build_variants(job: ExportJob, data: LabelledSet, calib: np.ndarray, threshold: float, order: list[int],
                   work: Path) -> dict[str, Path]:
    """The six graphs as ONNX files in `work`."""
    fp32 = lambda j, folder: onnx_file(export_graph(j, "loop", folder, DEFAULT_OPSET))
    layout, args = job.opts.input_layout, job.args
    experts = {k: fp32(replace(job, opts=replace(job.opts, experts=(k,))), work / f"e{k}") for k in order}
    int8_experts = {k: quantize_most_accurate(p, calib, data, layout, args)[0] for k, p in experts.items()}
    paths = {BASELINE: experts[order[0]], "fp32 ensemble": fp32(job, work / "ensemble"),
             "int8 single": int8_experts[order[0]]}
    paths["int8 ensemble"] = quantize_most_accurate(paths["fp32 ensemble"], calib, data, layout, args)[0]
    for name, chosen in (("fp32", experts), ("int8", int8_experts)):
        path = work / f"early-exit-{name}.onnx"
        onnx.save(compose(load_experts([chosen[k] for k in order]), threshold), str(path))
        paths[f"{name} early exit"] = path
    return paths


def measure_costs(paths: dict[str, Path], inputs: np.ndarray, batches: list[int], budget_s: float) -> dict:
    """Latency ratio of every variant to the FP32 single expert at each batch size, interleaved."""
    sessions = {name: cpu_session(p) for name, p in paths.items()}
    out = {}
    for batch in batches:
        x = inputs[:batch]
        variants = {name: (lambda i, s=s: s.run(None, {"image": x})) for name, s in sessions.items()}
        result = interleave(variants, budget_s=budget_s)
        out[batch] = {name: {"median_ms": result.median_s(name) * 1e3, "vs_fp32_single": ratio(result, name, BASELINE).to_dict()}
                      for name in sessions}
    return out


def measure_accuracy(paths: dict[str, Path], data: LabelledSet, layout: str) -> dict:
    rows = {}
    for name, path in paths.items():
        sess = cpu_session(path)
        logits = run_logits(sess, data.inputs(layout))
        rows[name] = shot_accuracy(logits.argmax(1), data.labels, data.train_counts, data.shot_rule)
        if "early exit" in name:
            runs = np.concatenate([sess.run(["experts_run"], {"image": data.inputs(layout)[i:i + 256]})[0]
                                   for i in range(0, len(data.labels), 256)])
            rows[name]["mean_experts"] = float(runs.mean())
    return rows


def write_report(out: Path, accuracy: dict, costs: dict, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    (out / "cheap.json").write_text(json.dumps({"accuracy": accuracy, "costs": costs, **meta}, indent=2))
    batches = list(costs)
    lines = [f"# Cheap ensemble variants on {meta['machine']}", "", f"checkpoint `{meta['checkpoint']}`; "
             f"early-exit threshold {meta['threshold']:g}, expert order {meta['order']}", "",
             "| variant | top-1 | many | medium | few | experts/img | " + " | ".join(
                 f"cost b{b} (x FP32 single) [95% CI]" for b in batches) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(batches)]
    for name, acc in accuracy.items():
        cost = " | ".join(f"{costs[b][name]['vs_fp32_single']['ratio']:.2f} [{costs[b][name]['vs_fp32_single']['ci95'][0]:.2f}, "
                          f"{costs[b][name]['vs_fp32_single']['ci95'][1]:.2f}]" for b in batches)
        cells = " | ".join(f"{acc[g]:.1f}" if acc[g] == acc[g] else "-" for g in ("overall", "many", "medium", "few"))
        lines.append(f"| {name} | {cells} | {acc.get('mean_experts', 3 if 'ensemble' in name else 1):.2f} | {cost} |")
    (out / "cheap.md").write_text("\n".join(lines + ["", "Command:", "", "    " + meta["command"], ""]))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name, acc in accuracy.items():
            r = costs[b][name]["vs_fp32_single"]
            ax.errorbar(r["ratio"], acc["overall"], xerr=[[r["ratio"] - r["ci95"][0]], [r["ci95"][1] - r["ratio"]]], fmt="o")
            ax.annotate(name, (r["ratio"], acc["overall"]), fontsize=8)
        ax.axvline(1.5, ls="--", c="grey")
        ax.set(title=f"batch {b}", xlabel="cost (x one FP32 expert)", ylabel="top-1 %")
    fig.tight_layout()
    fig.savefig(out / "cheap.png", dpi=120)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m export.costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/cheap-cpu"))
    p.add_argument("--batches", type=int_list, default=[1, 64])
    p.add_argument("--budget-s", type=float, default=20.0, help="interleaved timing per batch size [20]")
    p.add_argument("--machine", default="2-core shared CPU (AMD EPYC, AVX2, no VNNI)")
    add_int8_args(p)
    add_early_exit_args(p)
    args = p.parse_args(argv)
    job = job_for(args.ckpt)
    job.args.__dict__.update({k: v for k, v in vars(args).items() if k not in ("ckpt",)})
    bundle = load_bundle(job.checkpoint, args)
    data = evaluation_set(bundle, job.checkpoint, job.spec, args)
    calib = to_model_input(calibration_pixels(bundle, job.spec, args.calib_images), job.opts.input_layout)
    logits = expert_logits(job.model, data)
    order = expert_order(logits, data.labels, job.opts.experts)
    threshold = choose_threshold(logits, data, order)[0] if args.early_exit in (None, "auto") else args.early_exit
    with tempfile.TemporaryDirectory(prefix="expertfuse-costs-") as tmp:
        paths = build_variants(job, data, calib, threshold, order, Path(tmp))
        accuracy = measure_accuracy(paths, data, job.opts.input_layout)
        costs = measure_costs(paths, data.inputs(job.opts.input_layout), args.batches, args.budget_s)
    meta = {"machine": args.machine, "checkpoint": str(args.ckpt), "threshold": threshold, "order": order,
            "command": "python -m export.costs " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_report(args.out, accuracy, costs, meta)
    print((args.out / "cheap.md").read_text())
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(main))
