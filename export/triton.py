"""How an export enters the Triton model repository: its tensors, its serving settings and the write through
serve.repository (the one config writer, whose pid-named staging folders a later writer cleans up)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from expertfuse.contract import EXPERT_LOGITS, INPUT, LOGITS, PROBS, TRITON_INPUT, ModelMetadata
from export.job import ExportJob
from export.request import ExportRequest
from serve.repository import ServingOptions, TensorSpec, model_config, write_model


def signature(job: ExportJob) -> tuple[list[TensorSpec], list[TensorSpec]]:
    s = job.spec
    dtype, layout = TRITON_INPUT[job.opts.input_layout]
    dims = [s.input_size, s.input_size, 3] if layout == "NHWC" else [3, s.input_size, s.input_size]
    outputs = [TensorSpec(LOGITS, "FP32", [s.num_classes], labels=True)]
    if job.opts.probs:
        outputs.append(TensorSpec(PROBS, "FP32", [s.num_classes], labels=True))
    if job.opts.expert_logits:
        outputs.append(TensorSpec(EXPERT_LOGITS, "FP32", [len(job.opts.experts), s.num_classes]))
    return [TensorSpec(INPUT, dtype, dims, layout)], outputs


def serving_options(request: ExportRequest, **stage_settings) -> ServingOptions:
    """The Triton settings of the shared flags; each stage adds its own (ONNX Runtime, TensorRT)."""
    return ServingOptions(max_batch_size=request.max_batch, max_queue_delay_us=request.max_queue_delay_us,
                          preferred_batch_sizes=request.preferred_batch_sizes, instance_kind=request.kind,
                          instance_count=request.instance_count, gpus=request.gpus,
                          warmup_batch_sizes=[1, request.max_batch], versions=request.version_policy, **stage_settings)


def publish(job: ExportJob, platform: str, serving: ServingOptions, artifacts: dict[str, Path], fusion: str,
            metadata: ModelMetadata | None = None, extra_outputs: Sequence[TensorSpec] = ()) -> tuple[Path, int]:
    """Write the model's config (with its metadata as parameters; default the job's), labels and artifacts as a new
    version. `extra_outputs` are outputs beyond the job's signature (early exit's experts_run)."""
    inputs, outputs = signature(job)
    outputs += list(extra_outputs)
    meta = metadata or job.metadata(fusion)
    cfg = model_config(job.name, platform, inputs, outputs, serving, meta.triton_parameters())
    model_dir, version = write_model(job.request.out, cfg, artifacts, job.classes, overwrite=job.request.overwrite)
    print_summary(model_dir, version, inputs, outputs, fusion)
    return model_dir, version


def print_summary(model_dir: Path, version: int, inputs: list[TensorSpec], outputs: list[TensorSpec], fusion: str) -> None:
    files = sorted(p for p in (model_dir / str(version)).rglob("*") if p.is_file())
    print(f"wrote {model_dir}/ version {version} (fusion {fusion}):")
    for f in files + [model_dir / "config.pbtxt", model_dir / "labels.txt"]:
        print(f"  {f}  {f.stat().st_size / 1e6:.2f} MB")
    for t in inputs:
        print(f"  input  {t.name} {t.dtype} [-1, {', '.join(map(str, t.dims))}] ({t.format})")
    for t in outputs:
        print(f"  output {t.name} {t.dtype} [-1, {', '.join(map(str, t.dims))}]{' with labels' if t.labels else ''}")


