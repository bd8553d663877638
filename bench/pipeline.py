"""The bench's two stages on parsed flags (python -m bench parses them): the checkpoint and its labelled splits
loaded once, every in-process variant gated, scored and timed interleaved, then the served models; bench.json,
the CSVs, summary.md and the plots written at the end."""
from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.decide import (best_single, cost_accuracy, decision, headline_runtime, inprocess_ratios, mark_pareto,
                          scored)
from bench.measure.evaluation import gain_interval
from bench.measure.inprocess import (References, available_runtimes, plan_variants, reference_key, repository_variants,
                                     run_inprocess, with_repository_exports)
from bench.measure.machine import machine_info
from bench.measure.timed_images import TIMED_IMAGES
from bench.report import markdown, write_all
from bench.served_stage import run_served, served_target
from expertfuse.cli import unwind_on_signals
from expertfuse.errors import NothingMeasured, UserError
from expertfuse.files import report_name, report_settings
from export.data_flags import LabelledData
from export.early_exit import expert_order
from export.job import job_for
from export.labelled import EvalSet, expert_logits, load_splits


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
    planned = with_repository_exports(plan_variants(ctx.expert_order), args.repository, ctx.job.checkpoint.sha256,
                                      ctx.num_experts)
    variants = planned + repository_variants(args.repository, ctx.num_experts)
    print(f"in-process: {len(variants)} variants on {', '.join(runtimes)}; batches {args.batches}")
    reused = [f"{v.name} ({v.exported[0]})" for v in planned if v.exported]
    if reused:
        print(f"  the repository's exports of this checkpoint, gated and timed as they are: {', '.join(reused)}")
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


def run_bench(args) -> dict:
    """The whole bench for parsed flags (bench.__main__'s); returns what bench.json holds."""
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
