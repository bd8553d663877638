"""python -m export.onnx: a training checkpoint -> one ONNX graph of the fused experts in model_repository/.

  python -m export.onnx --ckpt runs/ncl/ncl.pt [--experts all|0|0,2] [--fusion loop|grouped|auto]
      [--input uint8-nhwc|float-nchw] [--max-batch 64] [--probs] [--expert-logits] [--fp16]
      [--out|--model-repository model_repository]
      [--int8 [INT8 flags]] [--early-exit auto[:TOL]|T|MANY,MEDIUM,FEW] [training data flags]

Exports with torch.onnx (dynamo, dynamic batch, opset 18), checks with onnx.checker, runs the result in
ONNX Runtime at batches 1, 2, 7 and max against PyTorch, and only then adds it to the repository.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from expertfuse.cli import run_cli
from expertfuse.contract import INPUT, LOGITS
from expertfuse.errors import UserError
from expertfuse.timing import describe_choice, pick_fastest
from export.early_exit import add_early_exit_args, export_early_exit
from export.gate import first_passing, test_images
from export.graph import FUSIONS, InferenceGraph
from export.job import ExportJob, build_job, with_experts
from export.data_flags import LabelledData
from export.naming import naive_ensemble_names
from export.quantize import Int8Settings, add_int8_args, export_int8, write_report
from export.torchlib import torchlib_registry_built_once
from export.sessions import session_options
from export.request import DEFAULT_OPSET, ExportRequest, add_request_args, request_from_args, validate
from export.triton import publish_set, serving_options, signature, staged_model
from serve.repository import ServingOptions, StagedModel, naive_ensemble_models, staging

__all__ = ["DEFAULT_OPSET", "export_graph", "onnx_file", "written_opset", "export_onnx"]
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom


def providers() -> list[str]:
    """CUDA first when both onnxruntime-gpu and a GPU are usable, then CPU."""
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def export_graph(job: ExportJob, fusion: str, folder: Path, opset: int) -> Path:
    """Export the graph with `fusion` to folder/model.onnx: a file, or (over 2 GB) the folder layout
    Triton expects for external data, model.onnx/model.onnx plus its weight file. Returns that artifact."""
    graph = InferenceGraph(job.model, replace(job.opts, fusion=fusion)).eval()
    example = test_images(job, 2)["random"]  # batch >= 2, or torch.export specializes the batch to 1
    with warnings.catch_warnings(), torchlib_registry_built_once():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=({0: "batch"},),
                                    input_names=[INPUT], output_names=job.opts.output_names,
                                    opset_version=opset, optimize=True, verbose=False)
    large = sum(p.numel() * p.element_size() for p in graph.parameters()) > EXTERNAL_DATA_BYTES
    artifact = folder / "model.onnx"
    path = artifact / "model.onnx" if large else artifact
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=large)
    proto = onnx.load(str(path), load_external_data=False)
    if written_opset(proto) != opset:
        raise UserError(f"torch.onnx wrote opset {written_opset(proto)}, not the --opset {opset} asked for")
    # The lowest IR version that carries the graph's opsets (IR 8 for opset 18), never higher than the exporter's:
    # any ONNX Runtime that knows the opset then loads it, including an older one inside a Triton container.
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import), True))
    for key, value in job.metadata(fusion).to_properties().items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "expertfuse"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return artifact


def written_opset(model: onnx.ModelProto | Path) -> int:
    """The default-domain opset a model (or .onnx file) actually carries."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_file(artifact: Path) -> Path:
    """The .onnx file inside an artifact (itself, or model.onnx/model.onnx for external data)."""
    return artifact / "model.onnx" if artifact.is_dir() else artifact


def onnx_runner(path: Path):
    try:
        sess = ort.InferenceSession(str(path), session_options(), providers=providers())
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidGraph, NotImplemented) share no base
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime {ort.__version__} cannot load the exported graph: {first}") from None

    def run(images: np.ndarray) -> np.ndarray:
        return sess.run([LOGITS], {INPUT: images})[0]
    return run


def fusion_candidates(job: ExportJob, folder: Path, opset: int) -> tuple[list[str], dict]:
    """Export the asked fusion to folder/<fusion>/; for auto both, fastest first as ONNX Runtime runs them here
    (batch 1 and a mid-size batch, interleaved). Returns (the fusions in the order to gate them, the timings)."""
    if job.opts.fusion != "auto":
        export_graph(job, job.opts.fusion, folder / job.opts.fusion, opset)
        return [job.opts.fusion], {}
    images = test_images(job, min(job.request.max_batch, 32))["random"].numpy()
    inputs = {1: images[:1], len(images): images}
    runners = {f: onnx_runner(onnx_file(export_graph(job, f, folder / f, opset))) for f in FUSIONS}
    best, timings = pick_fastest(runners, inputs)
    print(f"fusion auto on {providers()[0]}: {describe_choice(timings, best)}")
    return [best] + [f for f in FUSIONS if f != best], timings


@dataclass
class OnnxSettings:
    """export.onnx's own flags: the onnxruntime backend's settings and the naive-ensemble mode."""
    ort_threads: int = 0
    ort_tensorrt: bool = False
    ort_tensorrt_fp16: bool = False
    ort_tensorrt_cache: str = ""
    naive_ensemble: bool = False

    def validate(self, request: ExportRequest) -> "OnnxSettings":
        if self.ort_threads < 0:
            raise UserError("--ort-threads must be 0 (ONNX Runtime's default) or more")
        if (self.ort_tensorrt_fp16 or self.ort_tensorrt_cache) and not self.ort_tensorrt:
            raise UserError("--ort-tensorrt-fp16 and --ort-tensorrt-cache configure --ort-tensorrt; add it")
        if self.ort_tensorrt and request.kind != "gpu":
            raise UserError("--ort-tensorrt applies to GPU instances only; add --instance-kind gpu")
        if self.naive_ensemble and (request.probs or request.expert_logits):
            raise UserError("--naive-ensemble serves logits only (no --probs / --expert-logits)")
        return self

    def serving(self, request: ExportRequest) -> ServingOptions:
        return serving_options(request, ort_threads=self.ort_threads, ort_tensorrt=self.ort_tensorrt,
                               ort_tensorrt_fp16=self.ort_tensorrt_fp16, ort_tensorrt_cache=self.ort_tensorrt_cache)


@contextmanager
def staged_export(job: ExportJob, settings: OnnxSettings) -> Iterator[StagedModel]:
    """Export and check parity: the model to publish, staged until the block ends (nothing written if a step fails)."""
    request = job.request
    print(f"export {request.ckpt} -> {request.out}/{job.name}: experts {','.join(map(str, job.opts.experts))} of "
          f"{job.model.num_experts} ({job.spec.describe()}), input {request.input_layout}, "
          f"{'FP16' if request.fp16 else 'FP32'}, opset {request.opset}")
    with staging(request.out) as work:
        order, timings = fusion_candidates(job, work, request.opset)
        opset = written_opset(onnx_file(work / order[0] / "model.onnx"))
        print(f"onnx.checker passed (opset {opset}); running it in ONNX Runtime ({', '.join(providers())})")
        runners = {f: (lambda f=f: onnx_runner(onnx_file(work / f / "model.onnx"))) for f in order}
        fusion, parity, fallbacks = first_passing(job, runners, [1, 2, 7, request.max_batch])
        report = write_report(work, {"parity": parity, "tolerance": request.tolerance().describe(), "fusion": fusion,
                                     "fusion_order": order, "fusion_fallbacks": fallbacks,
                                     "fusion_timings_s": timings, "opset": opset, "providers": providers(),
                                     "checkpoint": str(request.ckpt)})
        yield staged_model(job, "onnxruntime_onnx", settings.serving(request),
                           {"model.onnx": work / fusion / "model.onnx", "export_report.json": report}, fusion)


def export_to_repository(job: ExportJob, settings: OnnxSettings) -> tuple[Path, int]:
    """Export, check parity and add the model to the repository."""
    with staged_export(job, settings) as model:
        return publish_set(job, [model])[0]


def export_naive_ensemble(job: ExportJob, settings: OnnxSettings) -> Path:
    """Each chosen expert as its own model plus Triton's ensemble scheduler and a mean step: the unfused baseline,
    published together once every expert passed its checks."""
    *singles, ensemble, _ = naive_ensemble_names(job.name, job.opts.experts)
    inputs, outputs = signature(job)
    with ExitStack() as stack:
        experts = [stack.enter_context(staged_export(with_experts(job, (k,), "loop", name), settings))
                   for k, name in zip(job.opts.experts, singles)]
        work = stack.enter_context(staging(job.request.out))
        models = experts + naive_ensemble_models(ensemble, singles, inputs[0], outputs[0], job.classes,
                                                 settings.serving(job.request), work)
        model_dir, version = publish_set(job, models)[-1]
    print(f"wrote {model_dir}/ version {version} (ensemble of {', '.join(singles)} + {ensemble}_mean)")
    return model_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(p, default_max_batch=64)
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (0: its default)")
    p.add_argument("--ort-tensorrt", action="store_true",
                   help="NGC Triton: run GPU instances through ONNX Runtime's TensorRT execution accelerator")
    p.add_argument("--ort-tensorrt-fp16", action="store_true", help="with --ort-tensorrt: FP16 precision mode")
    p.add_argument("--ort-tensorrt-cache", default="", help="with --ort-tensorrt: engine cache folder on the server")
    p.add_argument("--naive-ensemble", action="store_true",
                   help="instead: each expert as its own model + a Triton ensemble averaging them (<name>_naive)")
    add_int8_args(p)
    add_early_exit_args(p)
    return p


def cheap_suffix(int8: Int8Settings | None, early_exit) -> str:
    """The default name's mark of the cheaper graphs: ncl_int8, ncl_early_exit, ncl_int8_early_exit."""
    return ("_int8" if int8 else "") + ("_early_exit" if early_exit is not None else "")


def fp32_graph_writer(opset: int):
    """export_graph as INT8 and early exit call it: (job, fusion, folder) -> the FP32 .onnx file."""
    return lambda job, fusion, folder: onnx_file(export_graph(job, fusion, folder, opset))


def export_onnx(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    request = validate(request_from_args(args))
    settings = OnnxSettings(args.ort_threads, args.ort_tensorrt, args.ort_tensorrt_fp16, args.ort_tensorrt_cache,
                            args.naive_ensemble).validate(request)
    int8 = Int8Settings.from_args(args)
    labelled = LabelledData.from_args(args)
    if (int8 or args.early_exit is not None) and (request.fp16 or settings.naive_ensemble):
        raise UserError("--int8 and --early-exit build from the FP32 fused graph; drop --fp16 / --naive-ensemble")
    job = build_job(request, suffix=cheap_suffix(int8, args.early_exit))
    if args.early_exit is not None:
        return export_early_exit(job, args.early_exit, int8, labelled, settings.serving(request),
                                 fp32_graph_writer(request.opset))
    if int8:
        return export_int8(job, int8, labelled, settings.serving(request), fp32_graph_writer(request.opset))
    if settings.naive_ensemble:
        return export_naive_ensemble(job, settings)
    return export_to_repository(job, settings)[0]


if __name__ == "__main__":
    sys.exit(run_cli(export_onnx))
