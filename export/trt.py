"""python -m export.trt: a training checkpoint -> a TensorRT plan of the fused experts in model_repository/.

  python -m export.trt --ckpt runs/ncl/ncl.pt [--fp16] [--min-batch 1 --opt-batch 32 --max-batch 256 |
      --profiles 1-8,32-128-256] [--no-cuda-graphs] [--workspace-gb N] [--timing-cache FILE]
      [--version-compatible] [shared export flags]

The plan is built with the TensorRT Python API from the same ONNX graph export.onnx writes, with one
optimization profile per batch range (MIN-MAX or MIN-OPT-MAX; OPT defaults to MAX); Triton gets one
instance group per profile (instance_group.profile) and CUDA graphs for the preferred batch sizes.
TensorRT 10: FP32 ONNX plus the FP16 builder flag (weakly typed). TensorRT 11 (strongly typed, no
precision flags): --fp16 exports an FP16 graph with FP32 I/O. --int8 builds (strongly typed) from the
QDQ graph of export.quantize with symmetric activations, gated on the plan like export.onnx --int8. A sidecar build.json records the
TensorRT version and GPU compute capability the plan is tied to.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from expertfuse.cli import run_cli
from expertfuse.contract import INPUT, LOGITS, ModelMetadata
from expertfuse.errors import UserError
from expertfuse.files import atomic_path
from expertfuse.timing import describe_choice, pick_fastest
from export.gate import first_passing, test_images
from export.graph import FUSIONS
from export.job import ExportJob, build_job
from export.data_flags import LabelledData
from export.onnx import export_graph, onnx_file
from export.quantize import Int8Settings, TensorRTInt8, add_int8_args
from export.request import add_request_args, request_from_args, validate
from export.triton import publish, serving_options, signature
from serve.repository import ServingOptions, staging

INSTALL_HINT = "pip install expertfuse[trt] on a machine with an NVIDIA GPU"

# Every TensorRT Python name this module (and bench, through PlanRunner and build_plan) uses, as
# `Class.member`; tests/test_trt_bindings.py checks each against the real bindings of every major.
TENSORRT_API = (
    "__version__", "Logger", "Logger.WARNING", "Builder", "Builder.create_network", "Builder.create_builder_config",
    "Builder.create_optimization_profile", "Builder.build_serialized_network", "OnnxParser", "OnnxParser.parse_from_file",
    "OnnxParser.num_errors", "OnnxParser.get_error", "IBuilderConfig.set_memory_pool_limit", "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.set_flag", "BuilderFlag.VERSION_COMPATIBLE", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache", "ITimingCache.serialize",
    "IOptimizationProfile.set_shape", "IBuilderConfig.add_optimization_profile", "Runtime",
    "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context", "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name", "ICudaEngine.num_optimization_profiles", "ICudaEngine.get_tensor_profile_shape",
    "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",  # --int8 (TensorRT 11 keeps the flag; its networks always are)
    "BuilderFlag.TF32",  # cleared for FP32 plans (both majors keep it)
)
# Names used only on one major (TensorRT 11 has no precision builder flags: its networks are strongly typed).
TENSORRT_API_BY_MAJOR = {10: ("BuilderFlag.FP16",), 11: ()}


def tensorrt_api(major: int) -> tuple[str, ...]:
    return TENSORRT_API + TENSORRT_API_BY_MAJOR.get(major, ())


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
    version: str = trt.__version__
    return int(version.split(".")[0])


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile over the batch dimension."""
    min: int
    opt: int
    max: int

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def ordered(self) -> bool:
        """TensorRT's rule for an optimization profile: 1 <= MIN <= OPT <= MAX."""
        return 1 <= self.min <= self.opt <= self.max


def parse_profiles(text: str) -> list[Profile]:
    """argparse type: '1-8,32-256' or '1-4-8,32-128-256' (MIN-MAX with OPT = MAX, or MIN-OPT-MAX)."""
    profiles = []
    for part in text.split(","):
        try:
            values = [int(v) for v in part.split("-")]
        except ValueError:
            values = []
        profile = Profile(values[0], values[1], values[-1]) if len(values) in (2, 3) else None  # MIN-MAX: OPT is MAX
        if profile is None or not profile.ordered():
            raise argparse.ArgumentTypeError(f"profile {part!r}: expected MIN-MAX or MIN-OPT-MAX with 1 <= MIN <= OPT <= MAX")
        profiles.append(profile)
    if any(b.min <= a.max for a, b in zip(profiles, profiles[1:])):
        raise argparse.ArgumentTypeError(f"profiles {text!r} must be ascending batch ranges that do not overlap")
    return profiles


@dataclass
class PlanSettings:
    """export.trt's own flags: the profiles, the builder's settings and the TensorRT backend's CUDA graphs."""
    profiles: list[Profile]
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    version_compatible: bool = False
    cuda_graphs: bool = True
    int8: Int8Settings | None = None
    labelled: LabelledData = field(default_factory=LabelledData)

    def serving(self, request) -> ServingOptions:
        """One instance group per profile; CUDA graphs for the preferred batch sizes (default: each profile's OPT,
        preferred by the batcher only when there are several profiles, as Triton's batcher guide advises)."""
        opts = [p.opt for p in self.profiles]
        preferred = request.preferred_batch_sizes or (opts if len(self.profiles) > 1 else [])
        return serving_options(replace(request, preferred_batch_sizes=preferred), tensorrt_profiles=len(self.profiles),
                               cuda_graph_batch_sizes=(preferred or opts) if self.cuda_graphs else [])

    def parity_batches(self) -> list[int]:
        edges = {b for p in self.profiles for b in (p.min, p.max)} | {2, 7}
        return sorted(b for b in edges if any(p.covers(b) for p in self.profiles))


def build_plan(trt, onnx_path: Path, input_shape: tuple[int, ...], profiles: Sequence[Profile] | tuple[int, int, int],
               fp16: bool = False, workspace_gb: float = 4.0, timing_cache: Path | None = None,
               version_compatible: bool = False, strongly_typed: bool = False) -> bytes:
    """A serialized engine with one optimization profile per batch range (a (min, opt, max) tuple is one profile)."""
    if profiles and isinstance(profiles[0], int):
        profiles = [Profile(*profiles)]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TRT 10. TRT 10 stays weakly typed so the FP16 flag applies;
    # TRT 11 is always strongly typed and takes its precision from the (FP16) ONNX graph. An INT8 QDQ graph is
    # built strongly typed (TRT 10 opts in with the creation flag; TRT 11 accepts it).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and trt_major(trt) < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    if not fp16 and not strongly_typed:
        # TF32 is on by default for FP32 convolutions on Ampere and later: 10 mantissa bits, which the float32
        # export gate (held to float32's own error) rightly refuses.
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for p in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, (p.min, *input_shape), (p.opt, *input_shape), (p.max, *input_shape))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see its log above)")
    if timing_cache:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(plan))


class PlanRunner:
    """Runs a plan with execute_async_v3 on torch CUDA buffers (used for parity and by bench), switching to the
    optimization profile whose batch range holds the input."""

    def __init__(self, trt, plan: bytes):
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.ranges = [(shapes[0][0], shapes[2][0]) for shapes in
                       (self.engine.get_tensor_profile_shape(INPUT, i) for i in range(self.engine.num_optimization_profiles))]
        self.profile = 0

    def _select_profile(self, batch: int) -> None:
        index = next((i for i, (lo, hi) in enumerate(self.ranges) if lo <= batch <= hi), None)
        if index is None:
            raise UserError(f"batch {batch} fits none of the plan's profiles {self.ranges}")
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profile = index

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a CUDA input tensor, computed on the GPU (what bench times)."""
        self._select_profile(x.shape[0])
        self.context.set_input_shape(INPUT, tuple(x.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape(LOGITS)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(INPUT, x.data_ptr())
        self.context.set_tensor_address(LOGITS, logits.data_ptr())
        extra = []  # probs / expert_logits still need buffers, alive until the stream is done
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if name not in (INPUT, LOGITS):
                extra.append(torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda"))
                self.context.set_tensor_address(name, extra[-1].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return logits

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run_device(torch.from_numpy(images).cuda()).cpu().numpy()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(p, default_max_batch=None)
    p.add_argument("--min-batch", type=int, help="the one profile's smallest batch [1]")
    p.add_argument("--opt-batch", type=int, help="the one profile's batch TensorRT tunes for [32]")
    p.add_argument("--profiles", type=parse_profiles,
                   help="several optimization profiles, e.g. 1-8,32-256 (one Triton instance group each)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="Triton captures CUDA graphs for the preferred batch sizes [on]")
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache, read and updated")
    p.add_argument("--version-compatible", action="store_true",
                   help="plan loadable by later TensorRT (Triton: --backend-config=tensorrt,version-compatible=true)")
    add_int8_args(p)
    return p


def profiles_of(args: argparse.Namespace) -> list[Profile]:
    """--profiles, or the one profile of --min-batch/--opt-batch/--max-batch."""
    if args.profiles:
        if args.min_batch is not None or args.opt_batch is not None:
            raise UserError("--profiles replaces --min-batch/--opt-batch; give one or the other")
        if args.max_batch is not None and args.max_batch != args.profiles[-1].max:
            raise UserError(f"--max-batch {args.max_batch} differs from the largest profile's {args.profiles[-1].max}")
        return args.profiles
    hi = args.max_batch or 256
    profile = Profile(args.min_batch or 1, args.opt_batch or min(32, hi), hi)
    if not profile.ordered():
        raise UserError("need 1 <= --min-batch <= --opt-batch <= --max-batch")
    return [profile]


def prepare(argv: list[str] | None = None) -> tuple[ExportJob, PlanSettings]:
    """Everything that needs neither TensorRT nor a GPU: flags validated, checkpoint loaded, name chosen."""
    args = parser().parse_args(argv)
    profiles = profiles_of(args)
    request = replace(request_from_args(args), max_batch=profiles[-1].max)
    if request.instance_kind == "cpu":
        raise UserError("TensorRT plans run on GPU instances; drop --instance-kind cpu")
    request = validate(replace(request, instance_kind="gpu"))
    if args.workspace_gb <= 0:
        raise UserError("--workspace-gb must be positive")
    int8 = Int8Settings.from_args(args)
    if int8 and request.fp16:
        raise UserError("--int8 builds from the FP32 graph's QDQ form; drop --fp16")
    settings = PlanSettings(profiles, args.workspace_gb, args.timing_cache, args.version_compatible, args.cuda_graphs,
                            int8, LabelledData.from_args(args))
    return build_job(request, suffix="_int8_trt" if int8 else "_trt"), settings


def publish_plan(job: ExportJob, settings: PlanSettings, plan: Path, build_info: dict, fusion: str,
                 metadata: ModelMetadata | None = None) -> tuple[Path, int]:
    """Write the plan, its build.json and its config (instance group per profile, CUDA graphs) to the repository."""
    sidecar = plan.with_name("build.json")
    sidecar.write_text(json.dumps(build_info, indent=2))
    return publish(job, "tensorrt_plan", settings.serving(job.request), {"model.plan": plan, "build.json": sidecar}, fusion,
                   metadata)


def build_ranked(trt, job: ExportJob, settings: PlanSettings, work: Path,
                 int8: TensorRTInt8 | None = None) -> tuple[list[str], dict[str, bytes]]:
    """Build a plan per fusion strategy asked for (both for auto; from the QDQ graph with --int8). Returns the
    fusions fastest first on this GPU, and their plans."""
    fusions = list(FUSIONS) if job.opts.fusion == "auto" else [job.opts.fusion]
    shape = tuple(signature(job)[0][0].dims)
    # TensorRT 11 takes its precision from the graph: FP16 means an FP16 ONNX graph.
    graph_job = replace(job, opts=replace(job.opts, fp16=job.opts.fp16 and trt_major(trt) >= 11))
    plans = {}
    for fusion in fusions:
        graph = onnx_file(export_graph(graph_job, fusion, work / fusion, job.request.opset))
        plans[fusion] = build_plan(trt, int8.quantize(graph) if int8 else graph, shape, settings.profiles,
                                   job.opts.fp16, settings.workspace_gb, settings.timing_cache,
                                   settings.version_compatible, strongly_typed=int8 is not None)
    if len(fusions) == 1:
        return fusions, plans
    batches = sorted({settings.profiles[0].min} | {p.opt for p in settings.profiles})
    images = test_images(job, batches[-1])["random"].numpy()
    best, timings = pick_fastest({f: PlanRunner(trt, plans[f]) for f in fusions}, {b: images[:b] for b in batches})
    print(f"fusion auto on TensorRT: {describe_choice(timings, best)}")
    return [best] + [f for f in fusions if f != best], plans


def export_trt(argv: list[str] | None = None) -> Path:
    job, settings = prepare(argv)  # every check that needs no GPU comes first
    trt = require_tensorrt()
    int8 = TensorRTInt8(job, settings.int8, settings.labelled) if settings.int8 else None
    ranges = ", ".join(f"{p.min}/{p.opt}/{p.max}" for p in settings.profiles)
    print(f"export {job.request.ckpt} -> {job.request.out}/{job.name}: TensorRT {trt.__version__} on "
          f"{torch.cuda.get_device_name()}, profiles (min/opt/max) {ranges}, {'FP16' if job.opts.fp16 else 'FP32'}")
    with staging(job.request.out) as work:
        order, plans = build_ranked(trt, job, settings, work, int8)
        if int8:
            fusion = order[0]
            gate = int8.gate(PlanRunner(trt, plans[fusion]), onnx_file(work / fusion / "model.onnx"),
                             settings.profiles[-1].max)
            parity, meta = gate.to_dict(), job.metadata(fusion, "int8", gate.metadata_extra())
        else:
            runners = {f: (lambda f=f: PlanRunner(trt, plans[f])) for f in order}
            fusion, parity, _ = first_passing(job, runners, settings.parity_batches())
            meta = None
        (work / "model.plan").write_bytes(plans[fusion])
        major, minor = torch.cuda.get_device_capability()
        model_dir, _ = publish_plan(job, settings, work / "model.plan", {
            "tensorrt": trt.__version__, "compute_capability": f"{major}.{minor}", "gpu": torch.cuda.get_device_name(),
            "fp16": job.opts.fp16, "int8": int8 is not None, "strongly_typed": trt_major(trt) >= 11 or int8 is not None,
            "profiles": [[p.min, p.opt, p.max] for p in settings.profiles],
            "version_compatible": settings.version_compatible, "fusion": fusion, "parity": parity}, fusion, meta)
    if settings.version_compatible:
        print("  start Triton with --backend-config=tensorrt,version-compatible=true to load this plan")
    return model_dir


if __name__ == "__main__":
    sys.exit(run_cli(export_trt))
