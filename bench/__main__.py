"""python -m bench: what the ensemble buys (accuracy) next to what it costs (latency), measured side by side.

  python -m bench --ckpt runs/ncl/ncl.pt [--runtimes onnxruntime-cpu,torch-cpu] [--batches 1,8,64]
      [--served --repository model_repository | --http-url H:P --grpc-url H:P] [--concurrency 1,2,4,8,16]
      [--protocols http,grpc] [--p99-budget-ms MS] [--dataset ... --data-root ...] [--out bench/results/latest]

Every variant (each expert, the best-k subsets, the fused ensemble loop/grouped, FP16, INT8 and early-exit
models of the repository, and each served model over HTTP and gRPC) is checked against the checkpoint's PyTorch
ensemble and scored on a labelled set (default: the checkpoint's own evaluation split) through the
served input path; the compared variants are then timed in one interleaved run, so every ratio comes
with its 95% interval. Writes bench.json, cost_accuracy.csv, inprocess.csv, served.csv, summary.md, plots.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.decide import (best_single, cost_accuracy, decision, headline_runtime, inprocess_ratios, mark_pareto,
                            scored)
from export.labelled import EvalSet, LabelledData, add_data_args, expert_logits, load_splits
from bench.measure.evaluation import gain_interval
from bench.measure.inprocess import (References, available_runtimes, plan_variants, reference_key, repository_variants,
                              run_inprocess)
from bench.measure.machine import machine_info
from bench.report import markdown, write_all
from bench.measure.served import PERF_ANALYZER_ENV, default_client_processes
from bench.measure.timed_images import TIMED_IMAGES
from bench.served_stage import run_served, served_target
from expertfuse.cli import (choice_list, name_list, positive_float, positive_int, positive_int_list, run_cli,
                            unwind_on_signals)
from expertfuse.errors import NothingMeasured, UserError
from expertfuse.files import report_name, report_settings
from export.early_exit import expert_order
from export.job import job_for
from serve.protocols import PROTOCOLS
from serve.server import SERVERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="training checkpoint")
    p.add_argument("--runtimes", type=name_list,
                   help=f"comma-separated (default: all available here: {','.join(available_runtimes())})")
    p.add_argument("--batches", type=positive_int_list, default=[1, 8, 64],
                   help="in-process batch sizes [1,8,64]")
    p.add_argument("--budget-s", type=positive_float, default=8.0, help="seconds of interleaved timing per batch size [8]")
    p.add_argument("--window-s", type=positive_float, default=1.0, help="length of one served measurement window [1.0]")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process variants")
    p.add_argument("--served", action="store_true", help="also measure through Triton")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="model repository: its INT8 and early-exit models are benched too; Triton is started on it "
                        "unless --http-url/--grpc-url are given")
    p.add_argument("--server", default="auto", choices=SERVERS, help="which Triton to start [auto]")
    p.add_argument("--http-url", help="a running Triton's HTTP endpoint host:port")
    p.add_argument("--grpc-url", help="a running Triton's gRPC endpoint host:port")
    p.add_argument("--model", help="served fused model name (default: the checkpoint's method, e.g. ncl)")
    p.add_argument("--protocols", type=choice_list(PROTOCOLS),
                   help="served protocols measured [http,grpc; with only --http-url or --grpc-url: that one]")
    p.add_argument("--concurrency", "--concurrency-range", type=positive_int_list, default=[1, 2, 4, 8, 16],
                   help="served concurrency levels, each one measured [1,2,4,8,16]")
    p.add_argument("--served-batch", type=positive_int, default=1, help="images per served request [1]")
    p.add_argument("--shared-memory", action="store_true",
                   help="the interleaved served timing passes tensors through system shared memory, as perf_analyzer "
                        "--shared-memory system: no serialization in the served / in-process ratio (Triton on this host)")
    p.add_argument("--load-generator", default="auto", choices=["auto", "python", "perf_analyzer"],
                   help="the sweep's load: perf_analyzer, our Python generator, or auto: perf_analyzer wherever a "
                        "working binary is found, else Python [auto]")
    p.add_argument("--perf-analyzer", metavar="PATH", help=f"the perf_analyzer binary [${PERF_ANALYZER_ENV}, else PATH]")
    p.add_argument("--client-processes", type=positive_int,
                   help=f"most Python load processes [half the cores: {default_client_processes()}]")
    p.add_argument("--client", default="asyncio", choices=["asyncio", "threads"],
                   help="inside each Python load process: asyncio coroutines with one connection each, or threads "
                        "with sync clients [asyncio]")
    p.add_argument("--p99-budget-ms", type=positive_float,
                   help="served p99 latency budget: drawn on the latency-throughput plot, and the summary names the "
                        "highest throughput within it per model and protocol")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    add_data_args(p)
    return p


@dataclass
class Context:
    """What both stages share: the checkpoint loaded once, its labelled set and references, the in-process results."""
    ckpt: Path
    job: object
    data: EvalSet
    refs: References
    expert_order: list[int]
    runtime: str
    workdir: Path
    inprocess_logits: dict
    fused_name: str
    fused_fusion: str = "grouped"

    @property
    def num_experts(self) -> int:
        return len(self.expert_order)

    @property
    def best_expert(self) -> int:
        return self.expert_order[0]


def runtimes_of(args) -> list[str]:
    runtimes = args.runtimes or available_runtimes()
    unknown = set(runtimes) - set(available_runtimes())
    if unknown:
        raise UserError(f"runtime(s) not available here: {', '.join(sorted(unknown))} (available: "
                        f"{', '.join(available_runtimes())})")
    return runtimes


def inprocess_stage(args, ctx: Context, runtimes: list[str], result: dict) -> None:
    variants = plan_variants(ctx.expert_order) + repository_variants(args.repository, ctx.num_experts)
    print(f"in-process: {len(variants)} variants on {', '.join(runtimes)}; batches {args.batches}")
    rows, timings = run_inprocess(ctx.job, runtimes, variants, ctx.refs, ctx.data, args.batches, args.budget_s,
                                  ctx.workdir)
    ctx.runtime = headline_runtime(rows) or ctx.runtime
    predictions = {}
    for row in rows:
        logits = row.pop("logits", None)
        if logits is not None and "accuracy" in row and row["runtime"] == ctx.runtime:
            ctx.inprocess_logits[reference_key(row["experts"], row["precision"], row.get("early_exit_threshold"))] = logits
            predictions[row["variant"]] = logits.argmax(1)
    result["inprocess"] = rows
    result["not_measured"] += [f"in-process batch {b}: {t.not_measured}" for b, t in timings.items() if not t.measured]
    timings = {b: t for b, t in timings.items() if t.measured}
    by_name = scored(rows, ctx.runtime)
    single = best_single(by_name, ctx.expert_order)
    if single is None or not timings:
        return
    result["single"] = single
    result["ratios"] += inprocess_ratios(by_name, timings, ctx.runtime, single)
    result["points"] += cost_accuracy(by_name, timings, ctx.runtime, single)
    result["decision"] = decision(result["points"], result["ratios"], single,
                                  lambda a, b: gain_interval(predictions[a], predictions[b], ctx.data), args.budget_s)
    fastest = [r for r in result["ratios"] if r["ratio_name"] == "grouped / loop" and r["batch"] == min(timings)]
    ctx.fused_fusion = "grouped" if fastest and fastest[0]["ratio"] <= 1 else "loop"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    unwind_on_signals()
    runtimes = runtimes_of(args)
    job = job_for(args.ckpt, "all", "loop")  # the checkpoint, loaded once; every variant is a view of this job
    calibration, data = load_splits(job.checkpoint.data, job.spec, LabelledData.from_args(args))
    print(f"scored on the {data.source}; chosen on the {calibration.source}; shot rule {data.shot_rule}")
    refs = References.build(job.model, data)
    order = expert_order(expert_logits(job.model, calibration.pixels), calibration.labels,
                         tuple(range(job.model.num_experts)))
    result = {"checkpoint": report_name(args.ckpt, args.out), "machine": machine_info(),
              "settings": report_settings(args, args.out),
              "evaluation": {"source": data.source, "chosen_on": calibration.source, "images": len(data.labels),
                             "timed_images": TIMED_IMAGES,
                             "calibration_images": len(calibration.labels), "shot_rule": data.shot_rule,
                             "train_counts": data.train_counts, "classes": job.classes},
              "inprocess": [], "served": {}, "ratios": [], "points": [], "single": f"expert{order[0]}", "decision": None,
              "not_measured": [], "p99_budget_ms": args.p99_budget_ms}
    with tempfile.TemporaryDirectory(prefix="expertfuse-bench-") as tmp, ExitStack() as served:
        ctx = Context(args.ckpt, job, data, refs, order, "onnxruntime-cpu", Path(tmp), {},
                      args.model or job.method)
        target = served.enter_context(served_target(args, ctx)) if args.served else None  # checked before measuring
        if not args.no_inprocess:
            inprocess_stage(args, ctx, runtimes, result)
        if target is not None:
            print(f"served: concurrency {args.concurrency}, batch {args.served_batch}, {','.join(target.urls)}")
            result["served"] = run_served(args, ctx, target)
            result["ratios"] += result["served"]["ratios"]
            result["points"] += result["served"]["points"]
            result["not_measured"] += result["served"]["not_measured"]
    mark_pareto(result["points"])
    files = write_all(result, args.out)
    print()
    print(markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    if args.served and not result["served"]["sweep"]:
        raise NothingMeasured(f"no served model was measured: every model of {args.ckpt} the server has was refused "
                              f"(see {args.out / 'summary.md'})")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
