"""python -m bench.cheap: cost and accuracy of the cheaper variants next to the FP32 single expert and ensemble.

  python -m bench.cheap --ckpt runs/ncl/ncl.pt --out bench/results/cheap-cpu [--early-exit auto[:TOL[:CONF]]|T|MANY,MEDIUM,FEW]
      [--batches 1,64] [--budget-s 8] [--repository DIR] [INT8 flags] [training data and calibration flags]

Exports, through export.onnx (each one gated as the export gates it; a refused one is reported and left
out), INT8 single (the best expert on the calibration split), INT8 ensemble, early-exit ensemble (FP32 and
INT8) into a repository (default: a temporary one), then runs the bench on ONNX Runtime CPU with that
repository: every variant scored overall and per shot group on the evaluation split and timed interleaved,
so each cost is a ratio to the FP32 single expert with its 95% interval, in bench's table and cost-accuracy
plot. Every choice (best expert, early-exit order and thresholds, INT8 calibration) is made on the
calibration split. The FP32 early-exit export's whole threshold curve, calibration and evaluation accuracy
side by side, goes to early_exit_curve.csv / .png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.__main__ import main as bench_main
from bench.report import plot_early_exit_curve, write_csv
from expertfuse.cli import positive_float, positive_int_list, run_cli
from expertfuse.errors import ParityError
from expertfuse.files import write_text
from export.early_exit import Auto, expert_order, parse_threshold
from export.job import job_for
from export.data_flags import CALIB_FLAGS, DATA_FLAGS, LabelledData
from export.labelled import expert_logits, load_calibration_set
from export.onnx import export_onnx
from export.quantize import INT8_FLAGS, add_int8_args
from serve.repository import versions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cheap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/cheap-cpu"))
    p.add_argument("--repository", type=Path, help="where the cheap variants are exported (default: a temporary one)")
    p.add_argument("--early-exit", type=parse_threshold, default=Auto(), metavar="auto[:TOL[:CONF]]|T|MANY,MEDIUM,FEW",
                   help="[auto]")
    p.add_argument("--batches", type=positive_int_list, default=[1, 64], help="[1,64]")
    p.add_argument("--budget-s", type=positive_float, default=8.0, help="seconds of interleaved timing per batch size [8]")
    add_int8_args(p)  # --int8 itself is implied here
    return p


def flags(args: argparse.Namespace, names) -> list[str]:
    """The given (non-default None) flags of `names` back as command-line words, for the stages this one runs."""
    words = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, str(value)]
    return words


def data_words(args: argparse.Namespace) -> list[str]:
    """The labelled-data flags (training data, calibration split, image cap) passed on to export and bench."""
    return flags(args, DATA_FLAGS + list(CALIB_FLAGS)) + ["--eval-limit", str(args.eval_limit)]


def export_cheap_variants(args: argparse.Namespace, repository: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Export the four cheap variants; returns variant -> 'exported' or why the export refused it, and the model
    folders written."""
    int8_words = ["--int8", *flags(args, INT8_FLAGS)]
    job = job_for(args.ckpt)
    calibration = load_calibration_set(job.checkpoint.data, job.spec, LabelledData.from_args(args))
    best = expert_order(expert_logits(job.model, calibration.pixels), calibration.labels, job.opts.experts)[0]
    base = ["--ckpt", str(args.ckpt), "--out", str(repository), "--instance-kind", "cpu", "--fusion", "loop",
            *data_words(args)]
    threshold = ["--early-exit", str(args.early_exit)]
    runs = {"int8 single": int8_words + ["--experts", str(best)], "int8 ensemble": int8_words,
            "fp32 early exit": threshold, "int8 early exit": threshold + int8_words}
    outcome, folders = {}, {}
    for name, words in runs.items():
        print(f"\n== export {name}")
        try:
            folders[name] = export_onnx(base + words)
            outcome[name] = "exported"
        except ParityError as exc:
            outcome[name] = f"refused: {exc}"
            print(f"  {name} left out: {exc}")
    return outcome, folders


def early_exit_record(model_dir: Path) -> dict:
    """The early-exit section of the model's newest export_report.json."""
    version = model_dir / str(versions(model_dir)[-1])
    return json.loads((version / "export_report.json").read_text())["early_exit"]


def curve_rows(record: dict) -> list[dict]:
    """The threshold-cost-accuracy curve of an early-exit export, one row per setting, calibration and evaluation
    side by side, with the lower bounds auto judged each by (the global thresholds, then the chosen and the cheapest
    qualifying global setting)."""
    auto, tail = record["auto"], record["auto"].get("tail_group") or "few"
    rows = []
    for kind, row in [*(("global", r) for r in auto["global_curve"]), ("chosen", auto["chosen"]),
                      ("cheapest global", auto["cheapest_global"])]:
        rows.append({"setting": kind, "threshold": row["threshold"], "qualifies_on_calibration": row["ok"],
                     "calibration_experts_per_image": row["calibration_mean_experts"],
                     "calibration_top1": row["calibration"]["overall"], f"calibration_{tail}": row["calibration"][tail],
                     "calibration_lower_bound_top1": row["calibration_lower_bound"]["overall"],
                     f"calibration_lower_bound_{tail}": row["calibration_lower_bound"].get(tail),
                     "evaluation_experts_per_image": row["evaluation_mean_experts"],
                     "evaluation_top1": row["evaluation"]["overall"], f"evaluation_{tail}": row["evaluation"][tail]})
    return rows


def write_curve(record: dict, out: Path) -> list[Path]:
    """early_exit_curve.csv, early_exit_curve.png and early_exit.json (the whole record of auto's choice)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "early_exit_curve.csv", out / "early_exit_curve.png", out / "early_exit.json"]
    write_csv(curve_rows(record), files[0])
    plot_early_exit_curve(record, files[1])
    write_text(files[2], json.dumps(record, indent=2, default=float))
    return files


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="expertfuse-cheap-") as tmp:
        repository = args.repository or Path(tmp) / "model_repository"
        outcome, folders = export_cheap_variants(args, repository)
        result = bench_main(["--ckpt", str(args.ckpt), "--repository", str(repository), "--runtimes", "onnxruntime-cpu",
                             "--batches", ",".join(map(str, args.batches)), "--budget-s", str(args.budget_s),
                             "--out", str(args.out), *data_words(args)])
        if "fp32 early exit" in folders and isinstance(args.early_exit, Auto):
            record = early_exit_record(folders["fp32 early exit"])
            print("early exit auto: " + record["auto"]["why"])
            print("wrote " + ", ".join(str(f) for f in write_curve(record, args.out)))
    result["cheap_exports"] = outcome
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
