"""python -m export.trt: a training checkpoint -> a TensorRT plan of the fused experts in model_repository/.

  python -m export.trt --ckpt runs/ncl/ncl.pt [--fp16] [--min-batch 1 --opt-batch 32 --max-batch 256]
      [--workspace-gb N] [--timing-cache FILE] [--version-compatible] [shared export flags]

The plan is built with the TensorRT Python API from the same ONNX graph export.onnx writes: one
optimization profile over the batch range. TensorRT 10: FP32 ONNX plus the FP16 builder flag (weakly
typed). TensorRT 11 (strongly typed, no precision flags): --fp16 exports an FP16 graph with FP32 I/O.
A sidecar build.json records the TensorRT version and GPU compute capability the plan is tied to.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from export.common import (add_common_args, check_parity, metadata, prepare, print_summary,
                           serving_options, signature, test_images)
from export.onnx import DEFAULT_OPSET, export_graph, onnx_file
from export.quantize import TensorRTInt8, add_int8_args
from serve.repository import RepositoryError, model_config, write_model
from expertfuse.cli import run_cli
from expertfuse.timing import pick_fastest
from expertfuse.errors import UserError

INSTALL_HINT = "pip install expertfuse[trt] on a machine with an NVIDIA GPU"


def require_tensorrt():
    """The tensorrt module and a CUDA GPU, or a one-line UserError naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"TensorRT is not installed (Python module 'tensorrt'); {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise UserError(f"TensorRT needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); {INSTALL_HINT}")
    return tensorrt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_plan(trt, onnx_path: Path, input_shape: tuple[int, ...], batches: tuple[int, int, int], fp16: bool,
               workspace_gb: float, timing_cache: Path | None, version_compatible: bool, strongly_typed: bool = False) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TRT 10. TRT 10 stays weakly typed so the FP16 flag applies;
    # TRT 11 is always strongly typed and takes its precision from the (FP16) ONNX graph.
    # An INT8 QDQ graph is built strongly typed (TRT 10 opts in with the flag; TRT 11 always is).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and trt_major(trt) < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batches
    profile.set_shape("image", (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see its log above)")
    if timing_cache:
        tmp = timing_cache.with_name(timing_cache.name + ".tmp")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    return bytes(memoryview(plan))


class PlanRunner:
    """Runs a plan with execute_async_v3 on torch CUDA buffers (used for parity and by bench)."""

    def __init__(self, trt, plan: bytes):
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a CUDA input tensor, computed on the GPU (what bench times)."""
        self.context.set_input_shape("image", tuple(x.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("image", x.data_ptr())
        self.context.set_tensor_address("logits", logits.data_ptr())
        extra = []  # probs / expert_logits still need buffers, alive until the stream is done
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if name not in ("image", "logits"):
                extra.append(torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda"))
                self.context.set_tensor_address(name, extra[-1].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return logits

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run_device(torch.from_numpy(images).cuda()).cpu().numpy()


def export_trt(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_max_batch=256)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache, read and updated")
    p.add_argument("--version-compatible", action="store_true",
                   help="plan loadable by later TensorRT (Triton: --backend-config=tensorrt,version-compatible=true)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    add_int8_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        raise UserError("need 1 <= --min-batch <= --opt-batch <= --max-batch")
    job = prepare(args, suffix="_int8_trt" if args.int8 else "_trt")  # checkpoint errors first: they need no GPU
    trt = require_tensorrt()
    int8 = TensorRTInt8(job) if args.int8 else None
    parity_job = job  # parity is judged at the precision asked for (FP16 tolerances with --fp16)
    job = replace(job, opts=replace(job.opts, fp16=args.fp16 and trt_major(trt) >= 11))
    shape = tuple(signature(job)[0][0].dims)
    print(f"export {args.ckpt} -> {args.out}/{job.name}: TensorRT {trt.__version__} on {torch.cuda.get_device_name()}, "
          f"batch {args.min_batch}/{args.opt_batch}/{args.max_batch}, {'FP16' if args.fp16 else 'FP32'}")
    with tempfile.TemporaryDirectory(prefix="expertfuse-trt-") as tmp:
        work = Path(tmp)
        fusions = ["loop", "grouped"] if args.fusion == "auto" else [args.fusion]
        plans = {}
        for fusion in fusions:
            graph = onnx_file(export_graph(job, fusion, work / fusion, args.opset))
            plans[fusion] = build_plan(trt, int8.quantize(graph) if int8 else graph, shape,
                                       (args.min_batch, args.opt_batch, args.max_batch), args.fp16, args.workspace_gb,
                                       args.timing_cache, args.version_compatible, strongly_typed=bool(int8))
        fusion = fusions[0]
        if len(fusions) > 1:
            images = test_images(job, args.opt_batch)["random"].numpy()
            fusion, timings = pick_fastest({f: PlanRunner(trt, plans[f]) for f in fusions},
                                           {args.min_batch: images[:args.min_batch], args.opt_batch: images})
            print("fusion auto on TensorRT: " + "; ".join(f"{f} " + ", ".join(f"b{b} {t * 1e3:.2f} ms" for b, t in per.items())
                                                        for f, per in timings.items()) + f" -> {fusion}")
        parity = int8.gate(PlanRunner(trt, plans[fusion]), onnx_file(work / fusion / "model.onnx")) if int8 else \
            check_parity(parity_job, PlanRunner(trt, plans[fusion]),
                         sorted({args.min_batch, 2, 7, args.max_batch} & set(range(args.min_batch, args.max_batch + 1))))
        (work / "model.plan").write_bytes(plans[fusion])
        major, minor = torch.cuda.get_device_capability()
        (work / "build.json").write_text(json.dumps({
            "tensorrt": trt.__version__, "compute_capability": f"{major}.{minor}", "gpu": torch.cuda.get_device_name(),
            "fp16": args.fp16, "int8": args.int8, "strongly_typed": trt_major(trt) >= 11 or args.int8, "profile": [args.min_batch, args.opt_batch, args.max_batch],
            "version_compatible": args.version_compatible, "fusion": fusion, "parity": parity}, indent=2))
        inputs, outputs = signature(job)
        params = {k.replace(".", "_"): v for k, v in metadata(parity_job, fusion).items() if k != "expertfuse.classes"}
        if int8:
            params.update(expertfuse_precision="int8", expertfuse_int8_gate="passed")
        cfg = model_config(job.name, "tensorrt_plan", inputs, outputs, serving_options(args, args.max_batch), params)
        cfg.instance_group[0].kind = cfg.instance_group[0].KIND_GPU
        try:
            model_dir, version = write_model(args.out, cfg, {"model.plan": work / "model.plan", "build.json": work / "build.json"},
                                             job.checkpoint["classes"], overwrite=args.overwrite)
        except RepositoryError as exc:
            raise UserError(str(exc)) from None
    print_summary(model_dir, version, inputs, outputs, fusion)
    if args.version_compatible:
        print("  start Triton with --backend-config=tensorrt,version-compatible=true to load this plan")
    return model_dir


if __name__ == "__main__":
    sys.exit(run_cli(export_trt))
