"""python -m bench.real_size: what real-size networks cost on this machine, and how far that is from its limit.

  python -m bench.real_size [--models resnet32-100,resnet50-1000] [--batches 1,64] [--no-served]
      [--concurrency 1,4,16] [--out bench/results/real-size-cpu]

Networks of real size with random weights: a preset's architecture at its dataset's class count and input size,
its BatchNorm running statistics drawn like trained ones (mean U(-0.1, 0.1), variance U(0.5, 1.5)), written as a
checkpoint through the project's own API; costs only, never accuracy. For each: the default export and the naive
ensemble (time, peak memory), one expert vs the fused ensemble (loop, grouped) in ONNX Runtime at each batch,
interleaved (ratios with 95% intervals), each figure as GFLOP/s against a float32 GEMM timed in the same rounds
(the roofline's ceiling), then Triton over HTTP and gRPC: fused vs one expert vs the naive ensemble.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from bench.measure.machine import describe_machine, machine_info
from bench.report import ratio_rows, write_csv
from bench.measure.runners import OrtRunner, TritonRunner, cycling_calls
from bench.measure.served import measure_point
from bench.measure.timed_images import random_images
from expertfuse.cli import choice_list, positive_float, positive_int_list, run_cli
from expertfuse.contract import INPUT, LOGITS
from expertfuse.errors import UserError
from expertfuse.files import write_text
from expertfuse.timing import describe_ratio, interleave, ratio
from export.gate import test_images
from export.graph import FUSIONS, InferenceGraph
from export.job import ExportJob, build_job
from export.onnx import export_graph, onnx_file
from export.request import ExportRequest
from serve.server import TritonServer
from train.checkpoint import CheckpointPayload, save_checkpoint
from train.config import load_preset, resolve_config
from train.engine import preset_spec
from train.models import ModelSpec, build_model

# One preset per architecture the presets use (the shapes export must handle), smallest first.
ARCHITECTURE_PRESETS = ("ncl-cifar100-lt", "shike-cifar100-lt", "ssd-cifar100-lt", "ncl-imagenet-lt",
                        "ssd-imagenet-lt", "ncl-places-lt", "ncl-inat2018")


def random_checkpoint(spec: ModelSpec, path: Path, seed: int = 0, method: str = "ncl", config: dict | None = None) -> Path:
    """A checkpoint of `spec` with random weights and trained-like BatchNorm statistics (`config`: the training
    configuration it records, which names its dataset)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    draw = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=draw) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=draw) + 0.5)
    payload = CheckpointPayload(spec=spec, classes=[f"class{i}" for i in range(spec.num_classes)],
                                train_counts=[100] * spec.num_classes, state_dict=model.state_dict(), method=method,
                                config=config or {}, epoch=0, metrics={"weights": "random, trained-like BatchNorm statistics"})
    return save_checkpoint(payload, path)


def preset_checkpoint(preset: str, path: Path, seed: int = 0) -> Path:
    """`preset`'s network at real size with random weights, recording the preset's configuration."""
    cfg = resolve_config(load_preset(preset))
    return random_checkpoint(preset_spec(preset), path, seed, cfg.method, asdict(cfg))


# --- python -m bench.real_size: what real-size networks cost here, and how far that is from the machine's limit --

# The measured networks: their preset, and the largest in-process batch timed (and exported as max batch): the
# 224-px ones stop at 16, where one call already takes seconds on two cores.
MODELS = {"resnet32-100": ("ncl-cifar100-lt", 64), "resnet50-1000": ("ncl-imagenet-lt", 16),
          "resnext50-1000": ("ssd-imagenet-lt", 16), "resnet152-365": ("ncl-places-lt", 16)}


def run_measured(command: list[str]) -> dict:
    """Run a command to completion: its wall time and peak resident memory (its own high-water mark, from wait4)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().strip()
    if proc.returncode:
        raise UserError(f"{' '.join(command[2:4])} failed: {output.splitlines()[-1] if output else proc.returncode}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024}


def export_all(ckpt: Path, repo: Path, max_batch: int) -> dict:
    """The default export (fused, `--fusion auto`) and the naive ensemble (each expert + Triton's ensemble), each
    timed with its peak memory."""
    common = [sys.executable, "-m", "export.onnx", "--ckpt", str(ckpt), "--out", str(repo), "--max-batch", str(max_batch)]
    return {"fused (default export)": run_measured(common), "naive ensemble": run_measured(common + ["--naive-ensemble"])}


def flops_per_image(job: ExportJob, experts: tuple[int, ...]) -> float:
    """Floating-point operations (2 per multiply-add) of one image through the chosen experts, counted by PyTorch."""
    graph = InferenceGraph(job.model, replace(job.opts, experts=experts, fusion="loop")).eval()
    image = torch.zeros(1, job.spec.input_size, job.spec.input_size, 3, dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(image)
    return float(counter.get_total_flops())


GEMM_SIZE = 2048


def gemm_model(path: Path, size: int = GEMM_SIZE) -> Path:
    """A float32 size x size x size matrix product as an ONNX graph (the runners' tensor names): timed in ONNX
    Runtime beside the models, with the same threads under the same load, its best call is the roofline's ceiling
    (at 2048 ONNX Runtime's GEMM matches PyTorch's, about 180 GFLOP/s on this 2-core machine when quiet)."""
    weight = numpy_helper.from_array(np.random.RandomState(0).randn(size, size).astype(np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", [INPUT, "weight"], [LOGITS])], "gemm",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [size, size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def inprocess_costs(job: ExportJob, repo: Path, work: Path, batches: list[int], budget_s: float,
                    flops: dict[str, float]) -> tuple[list[dict], list[dict]]:
    """ONNX Runtime on this CPU, interleaved: one expert vs the fused ensemble (loop, grouped) at each batch, and
    a float32 GEMM in the same rounds. Returns the rows (latency, throughput, GFLOP/s, share of the GEMM's rate)
    and the ratios with their intervals."""
    paths = {"one expert": repo / f"{job.name}_expert{job.opts.experts[0]}" / "1" / "model.onnx"}
    paths |= {f"fused {f}": onnx_file(export_graph(job, f, work / f, job.request.opset)) for f in FUSIONS}
    paths["GEMM"] = gemm_model(work / "gemm.onnx")
    runners = {name: OrtRunner(path) for name, path in paths.items()}
    matrix = np.random.RandomState(1).randn(GEMM_SIZE, GEMM_SIZE).astype(np.float32)
    rows, ratios = [], []
    for batch in batches:
        images = test_images(job, batch)["random"].numpy()
        inputs = {n: [r.prepare(matrix if n == "GEMM" else images)] for n, r in runners.items()}
        timed = interleave(cycling_calls(runners, inputs), budget_s=budget_s, min_rounds=5,
                           calls_per_block=1 if batch > 8 else 2)
        peak = 2 * GEMM_SIZE ** 3 / min(t for block in timed.samples_s["GEMM"] for t in block) / 1e9  # its best
        for name in [n for n in paths if n != "GEMM"]:
            summary = timed.summary(name, batch)
            achieved = flops["one expert" if name == "one expert" else "ensemble"] * summary["items_per_s"] / 1e9
            rows.append({"variant": name, "batch": batch, **summary, "gflops": achieved, "gemm_gflops": peak,
                         "of_peak": achieved / peak})
        for num, den in (("fused loop", "one expert"), ("fused grouped", "one expert"), ("fused grouped", "fused loop")):
            ratios.append({"ratio_name": f"{num} / {den}", "batch": batch, **ratio(timed, num, den).to_dict()})
    return rows, ratios


def served_costs(job: ExportJob, repo: Path, concurrency: list[int], window_s: float, budget_s: float) -> dict:
    """Triton over HTTP and gRPC: the fused model, one expert and the naive ensemble, interleaved at concurrency 1
    (ratios with intervals), then each under concurrency `concurrency` (throughput, latency percentiles), and the
    server's peak memory."""
    models = {"fused": job.name, "one expert": f"{job.name}_expert{job.opts.experts[0]}",
              "naive ensemble": f"{job.name}_naive"}
    images = test_images(job, 1)["random"].numpy()
    out: dict = {"ratios": [], "sweep": []}
    with TritonServer(repo, "bundled", ready_timeout=600) as server:
        urls = {"http": server.endpoints.http, "grpc": server.endpoints.grpc}
        for protocol, url in urls.items():
            runners = {name: TritonRunner(url, protocol, model) for name, model in models.items()}
            try:
                timed = interleave(cycling_calls(runners, {n: [r.prepare(images)] for n, r in runners.items()}),
                                   budget_s=budget_s, min_rounds=5, calls_per_block=2)
            finally:
                for runner in runners.values():
                    runner.close()
            for num, den in (("fused", "one expert"), ("fused", "naive ensemble")):
                out["ratios"].append({"ratio_name": f"served {num} / {den}", "protocol": protocol, "batch": 1,
                                      **ratio(timed, num, den).to_dict()})
            for name, model in models.items():
                for c in concurrency:
                    point = measure_point(url, protocol, model, random_images(job.spec.input_size), 1, c, window_s=window_s)
                    out["sweep"].append({"variant": name, **point})
        out["server_peak_rss_mib"] = process_tree_peak_mib(server.process.pid)
    return out


def process_tree_peak_mib(pid: int) -> float:
    """The peak resident memory of a process and its descendants (Triton and its python-backend stubs), summed."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        proc = Path(f"/proc/{current}")
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        total += int(status.get("VmHWM", "0 kB").split()[0]) / 1024
        pending += [int(c) for task in (proc / "task").iterdir() for c in (task / "children").read_text().split()]
    return total


def measure_model(label: str, args) -> dict:
    """Checkpoint, exports, in-process and served costs of one real-size network."""
    preset, largest = MODELS[label]
    batches = args.batches or [1, largest]
    work = Path(tempfile.mkdtemp(prefix="expertfuse-real-size-"))
    try:
        ckpt = preset_checkpoint(preset, work / f"{label}.pt")
        repo = work / "model_repository"
        print(f"{label}: exporting ({preset}, random weights)", flush=True)
        exports = export_all(ckpt, repo, max(batches))
        job = build_job(ExportRequest(ckpt=ckpt, out=repo, fusion="loop", max_batch=max(batches)))
        flops = {"one expert": flops_per_image(job, job.opts.experts[:1]), "ensemble": flops_per_image(job, job.opts.experts)}
        print(f"{label}: {flops['one expert'] / 1e9:.2f} GFLOP per image per expert; timing in-process", flush=True)
        rows, ratios = inprocess_costs(job, repo, work, batches, args.budget_s, flops)
        served = served_costs(job, repo, args.concurrency, args.window_s, args.budget_s) if args.served else {}
        return {"model": label, "preset": preset, "spec": job.spec.describe(), "experts": len(job.opts.experts),
                "gflop_per_image": {k: v / 1e9 for k, v in flops.items()}, "exports": exports,
                "inprocess": rows, "ratios": ratios + served.get("ratios", []), "served": served}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.real_size", description=__doc__)
    p.add_argument("--models", type=choice_list(tuple(MODELS)), default=["resnet32-100", "resnet50-1000"],
                   help=f"networks to measure, of {','.join(MODELS)} [resnet32-100,resnet50-1000]")
    p.add_argument("--batches", type=positive_int_list,
                   help="in-process batch sizes (default: 1 and the model's largest: 64 at 32 px, 16 at 224 px)")
    p.add_argument("--budget-s", type=positive_float, default=20.0, help="seconds of interleaved timing per batch [20]")
    p.add_argument("--served", action=argparse.BooleanOptionalAction, default=True, help="also measure through Triton")
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 4, 16], help="served concurrency [1,4,16]")
    p.add_argument("--window-s", type=positive_float, default=5.0, help="one served measurement window [5]")
    p.add_argument("--out", type=Path, default=Path("bench/results/real-size-cpu"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = {"machine": machine_info(), "load_average": os.getloadavg(), "weights": "random, trained-like BatchNorm statistics: costs only, no accuracy",
              "models": [measure_model(label, args) for label in args.models]}
    result["load_average_after"] = os.getloadavg()
    write_real_size_report(result, args.out)
    return result


def markdown_report(result: dict) -> str:
    lines = [f"# Real-size cost on {describe_machine(result['machine'])}", "",
             f"Weights: {result['weights']}. Load average {result['load_average'][0]:.1f} before, "
             f"{result['load_average_after'][0]:.1f} after. The roofline's ceiling: the best call of a {GEMM_SIZE}^3 "
             "float32 matrix product in ONNX Runtime, timed in the same interleaved rounds as the models (same "
             "threads, same load); the models' GFLOP/s use their median latency. Rerun: `python -m bench.real_size`.",
             ""]
    for m in result["models"]:
        k = m["experts"]
        lines += [f"## {m['model']}: {m['spec']} (preset {m['preset']})", "",
                  f"{m['gflop_per_image']['one expert']:.2f} GFLOP per image per expert; the ensemble "
                  f"{m['gflop_per_image']['ensemble']:.2f}. Compute-bound, {k} experts cost at least {k}x one expert.",
                  "", "| export | wall s | peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {name} | {e['wall_s']:.0f} | {e['peak_rss_mib']:.0f} |" for name, e in m["exports"].items()]
        lines += ["", "| in-process (ONNX Runtime CPU) | batch | p50 ms | img/s | GFLOP/s | GEMM GFLOP/s | of GEMM |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.1f} | {r['items_per_s']:.1f} | {r['gflops']:.1f} | "
                  f"{r['gemm_gflops']:.1f} | {100 * r['of_peak']:.0f}% |" for r in m["inprocess"]]
        lines += ["", f"| ratio (latency, interleaved) | batch | value [95% interval] | vs the {k}x floor |",
                  "|---|---|---|---|"]
        lines += [f"| {r['ratio_name']}{' ' + r['protocol'] if 'protocol' in r else ''} | {r['batch']} | "
                  f"{describe_ratio(r)} | {r['ratio'] / k:.2f} of {k}x |" for r in m["ratios"]
                  if "one expert" in r["ratio_name"]]
        lines += [f"| {r['ratio_name']}{' ' + r['protocol'] if 'protocol' in r else ''} | {r['batch']} | "
                  f"{describe_ratio(r)} | |" for r in m["ratios"] if "one expert" not in r["ratio_name"]]
        if m["served"]:
            lines += ["", f"Triton (bundled, python backend running ONNX Runtime), peak RSS of the server and its "
                      f"model processes: {m['served']['server_peak_rss_mib']:.0f} MiB.", "",
                      "| served | protocol | concurrency | img/s | p50 ms | p99 ms | windows agree | client-bound |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [served_row(p) for p in m["served"]["sweep"]]
        lines.append("")
    return "\n".join(lines)


def served_row(p: dict) -> str:
    head = f"| {p['variant']} | {p['protocol']} | {p['concurrency']} |"
    if not p["measured"]:
        return f"{head} not measured: {p['not_measured']} | | | | |"
    return (f"{head} {p['throughput']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['stable']} | "
            f"{p['client_bound']} |")


def write_real_size_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench.json", json.dumps(result, indent=2, default=str))
    write_text(out / "summary.md", markdown_report(result))
    write_csv([{"model": m["model"], **r} for m in result["models"] for r in m["inprocess"]], out / "inprocess.csv")
    write_csv([{"model": m["model"], **r} for m in result["models"] for r in ratio_rows(m["ratios"])], out / "ratios.csv")
    write_csv([{"model": m["model"], **p} for m in result["models"] for p in m["served"].get("sweep", [])],
              out / "served.csv")
    print(markdown_report(result))
    print(f"wrote {out}/summary.md, bench.json, inprocess.csv, ratios.csv, served.csv")


if __name__ == "__main__":
    sys.exit(run_cli(main))
