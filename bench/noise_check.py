"""python -m bench.noise_check: does the interleaved ratio survive a competing load? Sequential timing beside it.

  python -m bench.noise_check --ckpt runs/demo/train/ncl.pt [--batch 8] [--budget-s 20]
      [--out bench/results/noise-check]

The ratio t_ensemble / t_best-expert (ONNX Runtime, grouped ensemble) is measured four ways: interleaved on the
machine as it is; interleaved again with a second process burning one core started halfway through; and
sequentially (ensemble, then expert) without and with that burner (started between the two measurements).
The interleaved ratio under load should stay within the interval of the undisturbed one; the sequential one
shows what the old method reports. Writes noise_check.json and README.md (with the exact command) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from export.data_flags import LabelledData
from export.labelled import expert_logits, load_eval_set
from bench.measure.inprocess import Variant, make_runner
from bench.measure.timed_images import timing_batches
from bench.measure.machine import describe_machine, machine_info
from bench.measure.runners import cycling_calls
from expertfuse.cli import positive_float, positive_int, run_cli
from expertfuse.files import report_name, write_text
from expertfuse.timing import interleave, measure, ratio
from export.early_exit import expert_order
from export.job import job_for


class Burner:
    """A second process spinning on one core, stopped by its own pid."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def interleaved_ratio(calls: dict, budget_s: float, burner: Burner | None) -> dict:
    """The ensemble/single ratio from one interleaved run; with a burner, it starts halfway through the run."""
    timer = threading.Timer(budget_s / 2, burner.start) if burner else None
    if timer:
        timer.start()
    try:
        result = interleave(calls, calls_per_block=3, min_rounds=10, max_rounds=100_000, budget_s=budget_s)
    finally:
        if timer:
            timer.cancel()
            timer.join()
        if burner:
            burner.stop()
    return ratio(result, "ensemble", "single").to_dict()


def sequential_ratio(calls: dict, window_s: float, burner: Burner | None) -> dict:
    """Each variant measured alone, one after the other (the old method); a burner starts between the two."""
    first = measure(calls["ensemble"], window_s=window_s)
    if burner:
        burner.start()
    try:
        second = measure(calls["single"], window_s=window_s)
    finally:
        if burner:
            burner.stop()
    return {"ratio": first.median_s / second.median_s, "ensemble_p50_ms": first.percentile_ms(50),
            "single_p50_ms": second.percentile_ms(50), "stable": first.stable and second.stable}


def inside(value: float, interval) -> bool:
    return interval[0] <= value <= interval[1]


def agreement(quiet: dict, loaded: dict) -> dict:
    """How the loaded interleaved ratio relates to the quiet one: relative change, and each inside the other's interval
    (a long quiet run can have an interval narrower than the load's real effect, so both directions are reported)."""
    return {"change_pct": round(100 * (loaded["ratio"] / quiet["ratio"] - 1), 2),
            "loaded_within_quiet_interval": inside(loaded["ratio"], quiet["ci95"]),
            "quiet_within_loaded_interval": inside(quiet["ratio"], loaded["ci95"])}


def readme(command: str, results: dict) -> str:
    seq = results["sequential_quiet"]
    check = results["agreement"]
    seq_change = 100 * (results["sequential_loaded"]["ratio"] / seq["ratio"] - 1)
    rows = [f"| {name.replace('_', ' ')} | {r['ratio']:.2f}x | "
            + (f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] n={r['samples']}" if "ci95" in r else "none") + " |"
            for name, r in results.items() if isinstance(r, dict) and "ratio" in r]
    within = {True: "within", False: "OUTSIDE"}
    return "\n".join([
        "# Noise check: t_ensemble / t_best-expert, interleaved vs sequential, with a CPU burner", "",
        "Command (from the repository root, PYTHONPATH set to it):", "", f"    {command}", "",
        f"Machine: {describe_machine(results['machine'])}, load average "
        f"{results['load_average']:.1f} when it started. Variants: {results['ensemble']} vs {results['single']} on ONNX Runtime CPU at batch "
        f"{results['batch']}. The burner is a second process spinning on one core.", "",
        "| measurement | ratio | 95% interval |", "|---|---|---|", *rows, "",
        f"With the burner started halfway, the interleaved ratio moved {check['change_pct']:+.1f}%: it is "
        f"{within[check['loaded_within_quiet_interval']]} the undisturbed run's interval, and the undisturbed ratio is "
        f"{within[check['quiet_within_loaded_interval']]} the loaded run's interval. The sequential ratio moved "
        f"{seq_change:+.1f}% with the burner started between its two measurements.", ""])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.noise_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--budget-s", type=positive_float, default=20.0, help="seconds per interleaved run [20]")
    p.add_argument("--window-s", type=positive_float, default=1.0, help="sequential measurement window [1.0]")
    p.add_argument("--out", type=Path, default=Path("bench/results/noise-check"))
    args = p.parse_args(argv)
    load_average = os.getloadavg()[0]
    job = job_for(args.ckpt, "all", "grouped")
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData(limit=300))
    # the best expert on the checkpoint's evaluation split, as in the bench
    best = expert_order(expert_logits(job.model, data.pixels), data.labels, tuple(range(job.model.num_experts)))[0]
    with tempfile.TemporaryDirectory(prefix="expertfuse-noise-") as tmp:
        runners = {"ensemble": make_runner("onnxruntime-cpu", job, Variant("e", tuple(range(job.model.num_experts)),
                                                                            "grouped"), Path(tmp)),
                   "single": make_runner("onnxruntime-cpu", job, Variant("s", (best,)), Path(tmp))}
        inputs = {k: r.prepare_all(timing_batches(data.pixels, args.batch)) for k, r in runners.items()}
        calls = cycling_calls(runners, inputs)
        results = {"interleaved_quiet": interleaved_ratio(calls, args.budget_s, None),
                   "interleaved_loaded": interleaved_ratio(calls, args.budget_s, Burner()),
                   "sequential_quiet": sequential_ratio(calls, args.window_s, None),
                   "sequential_loaded": sequential_ratio(calls, args.window_s, Burner())}
    results.update(batch=args.batch, ensemble="ensemble-grouped", single=f"expert{best}", machine=machine_info(),
                   load_average=load_average,
                   agreement=agreement(results["interleaved_quiet"], results["interleaved_loaded"]))
    args.out.mkdir(parents=True, exist_ok=True)
    typed = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.noise_check " + shlex.join(report_name(a, args.out) if os.path.isabs(a) else a
                                                           for a in typed)
    write_text(args.out / "noise_check.json", json.dumps(results, indent=2) + "\n")
    write_text(args.out / "README.md", readme(command, results))
    print(readme(command, results))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
