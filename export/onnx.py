"""python -m export.onnx: a training checkpoint -> one ONNX graph of the fused experts in model_repository/.

  python -m export.onnx --ckpt runs/ncl/ncl.pt [--experts all|0|0,2] [--fusion loop|grouped|auto]
      [--input uint8-nhwc|float-nchw] [--max-batch 64] [--probs] [--expert-logits] [--fp16] [--out model_repository]

Exports with torch.onnx (dynamo, dynamic batch, opset 18), checks with onnx.checker, runs the result in
ONNX Runtime at batches 1, 2, 7 and max against PyTorch, and only then adds it to the repository.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.common import (ExportJob, add_common_args, check_parity, default_name, metadata, prepare,
                           print_summary, serving_options, signature, test_images)
from export.early_exit import add_early_exit_args, export_early_exit
from export.graph import InferenceGraph
from export.quantize import add_int8_args, export_int8
from serve.repository import RepositoryError, ServingOptions, model_config, write_model, write_naive_ensemble
from expertfuse.cli import run_cli
from expertfuse.timing import pick_fastest
from expertfuse.errors import UserError

DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom


def providers() -> list[str]:
    """CUDA first when both onnxruntime-gpu and a GPU are usable, then CPU."""
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=providers())


def export_graph(job: ExportJob, fusion: str, folder: Path, opset: int) -> Path:
    """Export the graph with `fusion` to folder/model.onnx: a file, or (over 2 GB) the folder layout
    Triton expects for external data, model.onnx/model.onnx plus its weight file. Returns that artifact."""
    graph = InferenceGraph(job.model, replace(job.opts, fusion=fusion)).eval()
    example = test_images(job, 2)["random"]  # batch >= 2, or torch.export specializes the batch to 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=({0: "batch"},),
                                    input_names=["image"], output_names=job.opts.output_names,
                                    opset_version=opset, optimize=True, verbose=False)
    large = sum(p.numel() * p.element_size() for p in graph.parameters()) > EXTERNAL_DATA_BYTES
    artifact = folder / "model.onnx"
    path = artifact / "model.onnx" if large else artifact
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=large)
    proto = onnx.load(str(path), load_external_data=False)
    # The lowest IR version that carries the graph's opsets (IR 8 for opset 18), never higher than the exporter's:
    # any ONNX Runtime that knows the opset then loads it, including an older one inside a Triton container.
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import), True))
    for key, value in metadata(job, fusion).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "expertfuse"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return artifact


def onnx_file(artifact: Path) -> Path:
    """The .onnx file inside an artifact (itself, or model.onnx/model.onnx for external data)."""
    return artifact / "model.onnx" if artifact.is_dir() else artifact


def onnx_runner(path: Path):
    sess = session(path)

    def run(images: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"image": images})[0]
    return run


def choose_fusion(job: ExportJob, folder: Path, opset: int) -> tuple[str, dict]:
    """Export both strategies and keep the one ONNX Runtime runs faster (batch 1 and a mid-size batch)."""
    images = test_images(job, min(job.args.max_batch, 32))["random"].numpy()
    inputs = {1: images[:1], len(images): images}
    runners = {f: onnx_runner(onnx_file(export_graph(job, f, folder / f, opset))) for f in ("loop", "grouped")}
    best, timings = pick_fastest(runners, inputs)
    print("fusion auto on " + providers()[0] + ": " + "; ".join(
        f"{f} " + ", ".join(f"b{b} {t * 1e3:.2f} ms" for b, t in per.items()) for f, per in timings.items()) + f" -> {best}")
    return best, timings


def onnx_serving_options(args: argparse.Namespace) -> ServingOptions:
    """The shared Triton settings plus the onnxruntime backend's own (threads, TensorRT execution accelerator)."""
    opts = replace(serving_options(args, args.max_batch), ort_threads=args.ort_threads, ort_tensorrt=args.ort_tensorrt,
                   ort_tensorrt_fp16=args.ort_tensorrt_fp16, ort_tensorrt_cache=args.ort_tensorrt_cache)
    if (opts.ort_tensorrt_fp16 or opts.ort_tensorrt_cache) and not opts.ort_tensorrt:
        raise UserError("--ort-tensorrt-fp16 and --ort-tensorrt-cache configure --ort-tensorrt; add it")
    if opts.ort_tensorrt and opts.instance_kind != "gpu":
        raise UserError("--ort-tensorrt applies to GPU instances only; add --instance-kind gpu")
    return opts


def export_to_repository(job: ExportJob) -> tuple[Path, int]:
    """Export, check parity and add the model to the repository (nothing is written if any step fails)."""
    args = job.args
    serving = onnx_serving_options(args)
    print(f"export {args.ckpt} -> {args.out}/{job.name}: experts {','.join(map(str, job.opts.experts))} of "
          f"{job.model.num_experts} ({job.spec.describe()}), input {args.input_layout}, "
          f"{'FP16' if args.fp16 else 'FP32'}, opset {args.opset}")
    with tempfile.TemporaryDirectory(prefix="expertfuse-export-") as tmp:
        work = Path(tmp)
        fusion, timings = choose_fusion(job, work, args.opset) if job.opts.fusion == "auto" else (job.opts.fusion, {})
        artifact = work / fusion / "model.onnx"
        if not timings:
            export_graph(job, fusion, work / fusion, args.opset)
        print(f"onnx.checker passed; running it in ONNX Runtime ({', '.join(providers())})")
        parity = check_parity(job, onnx_runner(onnx_file(artifact)), [1, 2, 7, args.max_batch])
        inputs, outputs = signature(job)
        params = {k.replace(".", "_"): v for k, v in metadata(job, fusion).items() if k != "expertfuse.classes"}
        cfg = model_config(job.name, "onnxruntime_onnx", inputs, outputs, serving, params)
        report = work / "export_report.json"
        report.write_text(json.dumps({"parity": parity, "fusion": fusion, "fusion_timings_s": timings, "opset": args.opset,
                                      "onnxruntime": ort.__version__, "providers": providers(),
                                      "checkpoint": str(args.ckpt)}, indent=2))
        try:
            model_dir, version = write_model(args.out, cfg, {"model.onnx": artifact, "export_report.json": report},
                                             job.checkpoint["classes"], overwrite=args.overwrite)
        except RepositoryError as exc:
            raise UserError(str(exc)) from None
    print_summary(model_dir, version, inputs, outputs, fusion)
    return model_dir, version


def export_naive_ensemble(job: ExportJob) -> Path:
    """Each chosen expert as its own model plus Triton's ensemble scheduler and a mean step: the unfused baseline."""
    if job.args.probs or job.args.expert_logits:
        raise UserError("--naive-ensemble serves logits only (no --probs / --expert-logits)")
    names = []
    for k in job.opts.experts:
        name = default_name(job.checkpoint["method"], (k,), job.model.num_experts, job.args.fp16, "")
        export_to_repository(replace(job, name=name, opts=replace(job.opts, experts=(k,), fusion="loop")))
        names.append(name)
    inputs, outputs = signature(job)
    try:
        model_dir = write_naive_ensemble(job.args.out, f"{job.name}_naive", names, inputs[0], outputs[0],
                                         job.checkpoint["classes"], onnx_serving_options(job.args),
                                         overwrite=job.args.overwrite)
    except RepositoryError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {model_dir}/ (ensemble of {', '.join(names)} + {job.name}_naive_mean)")
    return model_dir


def export_onnx(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_max_batch=64)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset [{DEFAULT_OPSET}]")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (0: its default)")
    p.add_argument("--ort-tensorrt", action="store_true",
                   help="NGC Triton: run GPU instances through ONNX Runtime's TensorRT execution accelerator")
    p.add_argument("--ort-tensorrt-fp16", action="store_true", help="with --ort-tensorrt: FP16 precision mode")
    p.add_argument("--ort-tensorrt-cache", default="", help="with --ort-tensorrt: engine cache folder on the server")
    p.add_argument("--naive-ensemble", action="store_true",
                   help="instead: each expert as its own model + a Triton ensemble averaging them (<name>_naive)")
    add_int8_args(p)
    add_early_exit_args(p)
    args = p.parse_args(argv)
    job = prepare(args, suffix=("_int8" if args.int8 else "") + ("_early_exit" if args.early_exit is not None else ""))
    fp32_graph = lambda job, fusion, folder: onnx_file(export_graph(job, fusion, folder, args.opset))
    if args.early_exit is not None:
        return export_early_exit(job, fp32_graph)
    if args.int8:
        return export_int8(job, fp32_graph)
    if args.naive_ensemble:
        return export_naive_ensemble(job)
    return export_to_repository(job)[0]


if __name__ == "__main__":
    sys.exit(run_cli(export_onnx))
