"""python -m bench.cheap: cost and accuracy of the cheaper variants next to the FP32 single expert and ensemble.

  python -m bench.cheap --ckpt runs/ncl/ncl.pt --out bench/results/cheap-cpu [--early-exit auto|THRESHOLD]
      [--batches 1,64] [--budget-s 8] [--repository DIR] [INT8 flags] [training data flags]

Exports, through export.onnx (each one gated as the export gates it; a refused one is reported and left
out), INT8 single (the best expert), INT8 ensemble, early-exit ensemble (FP32 and INT8) into a
repository (default: a temporary one), then runs the bench on ONNX Runtime CPU with that repository:
every variant scored overall and per shot group on the labelled set and timed interleaved, so each
cost is a ratio to the FP32 single expert with its 95% interval, in bench's table and cost-accuracy plot.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.__main__ import main as bench_main
from expertfuse.cli import positive_float, positive_int_list, run_cli
from expertfuse.errors import ParityError
from export.early_exit import expert_order, parse_threshold
from export.job import job_for
from export.labelled import DATA_FLAGS, LabelledData, expert_logits, load_eval_set
from export.onnx import export_onnx
from export.quantize import INT8_FLAGS, add_int8_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cheap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/cheap-cpu"))
    p.add_argument("--repository", type=Path, help="where the cheap variants are exported (default: a temporary one)")
    p.add_argument("--early-exit", type=parse_threshold, default="auto", metavar="THRESHOLD|auto", help="[auto]")
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


def export_cheap_variants(args: argparse.Namespace, repository: Path) -> dict[str, str]:
    """Export the four cheap variants; returns variant -> 'exported' or why the export refused it."""
    data_words = flags(args, DATA_FLAGS) + ["--eval-limit", str(args.eval_limit)]
    int8_words = ["--int8", *flags(args, INT8_FLAGS)]
    job = job_for(args.ckpt)
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData.from_args(args))
    best = expert_order(expert_logits(job.model, data.pixels), data.labels, job.opts.experts)[0]
    base = ["--ckpt", str(args.ckpt), "--out", str(repository), "--instance-kind", "cpu", "--fusion", "loop",
            *data_words]
    threshold = ["--early-exit", str(args.early_exit)]
    runs = {"int8 single": int8_words + ["--experts", str(best)], "int8 ensemble": int8_words,
            "fp32 early exit": threshold, "int8 early exit": threshold + int8_words}
    outcome = {}
    for name, words in runs.items():
        print(f"\n== export {name}")
        try:
            export_onnx(base + words)
            outcome[name] = "exported"
        except ParityError as exc:
            outcome[name] = f"refused: {exc}"
            print(f"  {name} left out: {exc}")
    return outcome


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="expertfuse-cheap-") as tmp:
        repository = args.repository or Path(tmp) / "model_repository"
        outcome = export_cheap_variants(args, repository)
        result = bench_main(["--ckpt", str(args.ckpt), "--repository", str(repository), "--runtimes", "onnxruntime-cpu",
                             "--batches", ",".join(map(str, args.batches)), "--budget-s", str(args.budget_s),
                             "--out", str(args.out), *flags(args, DATA_FLAGS), "--eval-limit", str(args.eval_limit)])
    result["cheap_exports"] = outcome
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
