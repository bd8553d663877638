"""Does auto's early-exit choice hold on images it was not chosen on? Ten class-stratified halves of a checkpoint's
evaluation split: choose on one half (export.early_exit.choose_exit, the export's own search, on the PyTorch experts'
FP32 logits, as the export chooses), score on the other; at the point estimate (confidence 0.5) and at 0.95, 0.99.
Writes split_half.json beside this file's folder argument and prints one line per confidence.

    python bench/results/cheap-cpu/split_half.py --ckpt runs/demo/train/ncl.pt --out bench/results/cheap-cpu/demo
    python bench/results/cheap-cpu/split_half.py --ckpt runs/c10/ce3-r8-e40/ce.pt --data-root DATA \\
        --out bench/results/cheap-cpu/cifar10-lt-ce3-r8-e40
"""
import argparse
import json
from pathlib import Path

import numpy as np

from export.data_flags import LabelledData, add_data_args
from export.early_exit import AUTO_TOLERANCE_POINTS, ExitRule, Stages, choose_exit, expert_order
from export.job import job_for
from export.labelled import EvalSet, expert_logits, load_eval_set


def halves(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A class-stratified random half (mask) of a split."""
    first = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        first[members[: len(members) // 2]] = True
    return first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=10)
    add_data_args(p)
    args = p.parse_args()
    job = job_for(args.ckpt)
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData.from_args(args))
    logits = expert_logits(job.model, data.pixels)
    result = {"checkpoint": args.ckpt.name, "split": data.source, "tolerance_points": AUTO_TOLERANCE_POINTS,
              "repeats": args.repeats, "confidences": {}}
    for confidence in (0.5, 0.95, 0.99):
        rng, rows = np.random.default_rng(0), []  # the same halves for every confidence
        for _ in range(args.repeats):
            first = halves(data.labels, rng)
            a, b = (EvalSet(data.pixels[m], data.labels[m], data.train_counts, data.shot_rule, data.source)
                    for m in (first, ~first))
            order = expert_order(logits[first], a.labels, job.opts.experts)
            rule, record = choose_exit(logits[first], a, order, confidence=confidence)
            stages, tail = Stages(logits[~first], order, b), record["tail_group"]
            got, full = stages.score(rule), stages.score(ExitRule(1.0, 1.0, 1.0))
            diff = {g: got["accuracy"][g] - full["accuracy"][g] for g in ("overall", tail)}
            rows.append({"rule": str(rule), "experts_per_image": got["mean_experts"], "difference": diff,
                         "held": all(d >= -AUTO_TOLERANCE_POINTS for d in diff.values())})
        result["confidences"][str(confidence)] = rows
        print(f"confidence {confidence}: held {sum(r['held'] for r in rows)}/{len(rows)}, experts per image "
              f"{np.mean([r['experts_per_image'] for r in rows]):.2f}, worst overall "
              f"{min(r['difference']['overall'] for r in rows):+.2f}, worst tail "
              f"{min(list(r['difference'].values())[-1] for r in rows):+.2f}", flush=True)
    (args.out / "split_half.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
