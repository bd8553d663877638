"""How an export enters the Triton model repository: its tensors, its serving settings and the publish through
serve.repository (the one config writer): everything one export writes is published as one unit."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from expertfuse.contract import EXPERT_LOGITS, INPUT, KEY_PREFIX, LOGITS, PROBS, TRITON_INPUT, ModelMetadata
from export.job import ExportJob
from export.request import ExportRequest
from serve.repository import ServingOptions, StagedModel, TensorSpec, model_config, publish_models, string_parameters


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


def staged_model(job: ExportJob, platform: str, serving: ServingOptions, artifacts: dict[str, Path], fusion: str,
                 metadata: ModelMetadata | None = None, extra_outputs: Sequence[TensorSpec] = ()) -> StagedModel:
    """The model's config (with its metadata as parameters; default the job's), labels and artifacts, ready to
    publish. `extra_outputs` are outputs beyond the job's signature (early exit's experts_run)."""
    inputs, outputs = signature(job)
    meta = metadata or job.metadata(fusion)
    cfg = model_config(job.name, platform, inputs, outputs + list(extra_outputs), serving, meta.triton_parameters())
    return StagedModel(cfg, artifacts, job.classes)


def publish(job: ExportJob, platform: str, serving: ServingOptions, artifacts: dict[str, Path], fusion: str,
            metadata: ModelMetadata | None = None, extra_outputs: Sequence[TensorSpec] = ()) -> tuple[Path, int]:
    """Publish one model (staged_model's arguments) as a new version."""
    return publish_set(job, [staged_model(job, platform, serving, artifacts, fusion, metadata, extra_outputs)])[0]


def publish_set(job: ExportJob, models: Sequence[StagedModel]) -> list[tuple[Path, int]]:
    """Publish everything the export wrote as one unit (serve.repository.publish_models); prints what was written."""
    written = publish_models(job.request.out, models, overwrite=job.request.overwrite)
    for (model_dir, version), model in zip(written, models):
        print_summary(model_dir, version, model.cfg)
    return written


def print_summary(model_dir: Path, version: int, cfg: pb.ModelConfig) -> None:
    files = sorted(p for p in (model_dir / str(version)).rglob("*") if p.is_file())
    fusion = string_parameters(cfg).get(KEY_PREFIX + "fusion")
    print(f"wrote {model_dir}/ version {version}{f' (fusion {fusion})' if fusion else ''}:")
    for f in files + [model_dir / "config.pbtxt", model_dir / "labels.txt"]:
        print(f"  {f}  {f.stat().st_size / 1e6:.2f} MB")
    dtype = lambda t: pb.DataType.Name(t.data_type).removeprefix("TYPE_")  # noqa: E731
    for t in cfg.input:
        layout = f" ({pb.ModelInput.Format.Name(t.format).removeprefix('FORMAT_')})" if t.format else ""
        print(f"  input  {t.name} {dtype(t)} [-1, {', '.join(map(str, t.dims))}]{layout}")
    for t in cfg.output:
        print(f"  output {t.name} {dtype(t)} [-1, {', '.join(map(str, t.dims))}]{' with labels' if t.label_filename else ''}")
