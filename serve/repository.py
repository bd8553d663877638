"""The Triton model repository writer: the one place config.pbtxt files are produced.

Configs are built as `model_config_pb2.ModelConfig` messages and rendered with protobuf's text
format, so everything written parses back (tests do exactly that). Writes are atomic: a model
folder is staged next to the repository and swapped in with renames, so a failure leaves the
repository as it was.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from expertfuse.contract import check_model_name
from expertfuse.errors import UserError
from expertfuse.files import write_text

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"


class RepositoryError(UserError):
    """A repository that cannot be written or read as asked (one-line message)."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # Triton type without TYPE_: FP32, FP16, UINT8, BYTES
    dims: list[int]
    format: str = ""  # NHWC | NCHW for image inputs
    labels: bool = False  # output carries label_filename (classification extension)


@dataclass
class ServingOptions:
    max_batch_size: int = 64
    max_queue_delay_us: int = 100
    preferred_batch_sizes: list[int] = field(default_factory=list)
    instance_kind: str = "cpu"  # cpu | gpu
    instance_count: int = 1
    gpus: list[int] = field(default_factory=list)
    warmup_batch_sizes: list[int] = field(default_factory=lambda: [1])
    ort_threads: int = 0  # onnxruntime intra-op threads (0: its default)
    ort_tensorrt: bool = False  # ONNX Runtime's TensorRT execution accelerator (GPU instances)
    ort_tensorrt_fp16: bool = False
    ort_tensorrt_cache: str = ""
    versions: str = "latest:1"  # latest:N | all | specific:1,3
    cuda_graph_batch_sizes: list[int] = field(default_factory=list)  # TensorRT plans: CUDA graphs for these (empty: off)
    tensorrt_profiles: int = 0  # TensorRT plans with N optimization profiles: instance group i uses profile i


def version_policy(text: str) -> pb.ModelVersionPolicy:
    """'latest:N' | 'all' | 'specific:1,3' -> Triton's version_policy (RepositoryError on anything else)."""
    policy = pb.ModelVersionPolicy()
    kind, _, arg = text.partition(":")
    try:
        if kind == "latest" and int(arg or 1) > 0:
            policy.latest.num_versions = int(arg or 1)
        elif kind == "all" and not arg:
            policy.all.SetInParent()
        elif kind == "specific" and all(int(v) > 0 for v in arg.split(",")):
            policy.specific.versions.extend(int(v) for v in arg.split(","))
        else:
            raise ValueError
    except ValueError:
        raise RepositoryError(f"version policy must be latest:N, all or specific:V,...; got {text!r}") from None
    return policy


def model_config(name: str, platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 opts: ServingOptions, parameters: dict[str, str] | None = None) -> pb.ModelConfig:
    """A ModelConfig for an onnxruntime_onnx, tensorrt_plan or python model with batching on."""
    cfg = pb.ModelConfig(name=name, max_batch_size=opts.max_batch_size)
    if platform == "python":
        cfg.backend = "python"
    else:
        cfg.platform = platform
    for t in inputs:
        i = cfg.input.add(name=t.name, data_type=getattr(pb, f"TYPE_{t.dtype}"), dims=t.dims)
        if t.format:
            i.format = getattr(pb.ModelInput, f"FORMAT_{t.format}")
    for t in outputs:
        o = cfg.output.add(name=t.name, data_type=getattr(pb, f"TYPE_{t.dtype}"), dims=t.dims)
        if t.labels:
            o.label_filename = LABELS_FILE
    cfg.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(opts.preferred_batch_sizes)
    _instance_groups(cfg, opts)
    for batch in sorted(set(b for b in opts.warmup_batch_sizes if 0 < b <= opts.max_batch_size)):
        warmup = cfg.model_warmup.add(name=f"batch{batch}", batch_size=batch, count=1)
        for t in inputs:
            warmup.inputs[t.name].data_type = getattr(pb, f"TYPE_{t.dtype}")
            warmup.inputs[t.name].dims.extend(t.dims)
            warmup.inputs[t.name].random_data = True
    if platform == "onnxruntime_onnx":
        cfg.parameters["intra_op_thread_count"].string_value = str(opts.ort_threads)
        if opts.ort_tensorrt:
            accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accel.parameters["precision_mode"] = "FP16" if opts.ort_tensorrt_fp16 else "FP32"
            if opts.ort_tensorrt_cache:
                accel.parameters["trt_engine_cache_enable"] = "1"
                accel.parameters["trt_engine_cache_path"] = opts.ort_tensorrt_cache
    if platform == "tensorrt_plan" and opts.cuda_graph_batch_sizes:
        _cuda_graphs(cfg, inputs, opts.cuda_graph_batch_sizes)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    cfg.version_policy.CopyFrom(version_policy(opts.versions))
    return cfg


def _instance_groups(cfg: pb.ModelConfig, opts: ServingOptions) -> None:
    """One instance group, or one per TensorRT optimization profile (each restricted to its profile)."""
    kind = pb.ModelInstanceGroup.KIND_GPU if opts.instance_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    for profile in range(opts.tensorrt_profiles) if opts.tensorrt_profiles else [None]:
        group = cfg.instance_group.add(count=opts.instance_count, kind=kind)
        group.gpus.extend(opts.gpus)
        if profile is not None:
            group.profile.append(str(profile))


def _cuda_graphs(cfg: pb.ModelConfig, inputs: Sequence[TensorSpec], batch_sizes: Sequence[int]) -> None:
    """CUDA graphs in the TensorRT backend, with a graph spec per batch size (inputs without the batch dim)."""
    cfg.optimization.cuda.graphs = True
    for batch in sorted(set(batch_sizes)):
        spec = cfg.optimization.cuda.graph_spec.add(batch_size=batch)
        for t in inputs:
            spec.input[t.name].dim.extend(t.dims)


def render(cfg: pb.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def write_config(model_dir: Path, cfg: pb.ModelConfig) -> Path:
    """Write `model_dir`/config.pbtxt atomically (temporary file + rename) and check that it parses back;
    every config.pbtxt of the project (export's repository, serve's runtime repository) is written here."""
    path = Path(model_dir) / CONFIG_FILE
    text = render(cfg)
    parse(text)
    return write_text(path, text)


def parse(text: str) -> pb.ModelConfig:
    """Parse config.pbtxt text the way Triton does (protobuf text format); raises on any typo."""
    return text_format.Parse(text, pb.ModelConfig())


def read_config(model_dir: Path) -> pb.ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    try:
        return parse(path.read_text())
    except OSError:
        raise RepositoryError(f"{path}: cannot read") from None
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path}: {exc}") from None


def string_parameters(cfg: pb.ModelConfig | dict) -> dict[str, str]:
    """A model config's string parameters (where export records what the model is), from the protobuf or from the
    JSON form Triton's HTTP API returns."""
    if isinstance(cfg, dict):
        return {key: value.get("string_value", "") for key, value in cfg.get("parameters", {}).items()}
    return {key: value.string_value for key, value in cfg.parameters.items()}


def model_folders(repo: Path) -> list[Path]:
    """The model folders Triton will load from `repo`, each name checked first: a name Triton cannot
    serve would otherwise hang its start (the python-backend stub crashes on it)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository not found: {repo} (export one with python -m export.onnx)")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise RepositoryError(f"{repo} holds no models (export one with python -m export.onnx)")
    for model in models:
        try:
            check_model_name(model.name)
        except UserError as exc:
            raise RepositoryError(f"{repo}: {exc}; rename the folder {model.name!r} (and the name in its "
                                  f"{CONFIG_FILE})") from None
    return models


def versions(model_dir: Path) -> list[int]:
    """Numeric version folders, as Triton counts them (no leading zero)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_prefix(repo: Path) -> str:
    return f".{repo.name}-staging-"


def remove_stale_staging(repo: Path) -> list[Path]:
    """Remove the staging folders beside `repo` left by writers that died (their pid is gone)."""
    pattern = re.compile(re.escape(_staging_prefix(repo)) + r"(\d+)-")
    stale = [p for p in repo.parent.glob(_staging_prefix(repo) + "*")
             if (m := pattern.match(p.name)) and p.is_dir() and not _alive(int(m.group(1)))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staging(repo: Path) -> Iterator[Path]:
    """A work folder beside the repository (Triton would take a folder inside it for a model), named with our pid
    so that the next writer removes it if we are killed; removed when the block ends."""
    repo = Path(repo).absolute()
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(repo)
        folder = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(repo)}{os.getpid()}-", dir=repo.parent))
    except OSError as exc:
        raise RepositoryError(f"cannot write the model repository {repo}: {exc.strerror or exc}") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_model(repo: Path, cfg: pb.ModelConfig, artifacts: dict[str, Path], labels: Sequence[str] | None = None,
                overwrite: bool = False) -> tuple[Path, int]:
    """Add a version of model `cfg.name` holding `artifacts` (file name -> source file or folder, moved in).

    A re-export adds a version next to the existing ones; `overwrite` replaces the model folder.
    Returns (model folder, version number).
    """
    repo = Path(repo)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RepositoryError(f"cannot write the model repository {repo}: {exc.strerror or exc}") from None
    final = repo / cfg.name
    with staging(repo) as work:
        return _swap_in(final, work, cfg, artifacts, labels, overwrite)


def _swap_in(final: Path, work: Path, cfg: pb.ModelConfig, artifacts: dict[str, Path], labels: Sequence[str] | None,
             overwrite: bool) -> tuple[Path, int]:
    """Stage the model folder in `work` (old versions hard-linked, the new one moved in), then rename it over `final`."""
    try:
        staged = work / cfg.name
        staged.mkdir()
        existing = [] if overwrite else versions(final)
        for v in existing:  # hard links: no copy of the old artifacts, and the old folder stays intact
            shutil.copytree(final / str(v), staged / str(v), copy_function=os.link)
        version = (existing[-1] + 1) if existing else 1
        (staged / str(version)).mkdir()
        for name, source in artifacts.items():
            shutil.move(str(source), staged / str(version) / name)
        write_config(staged, cfg)
        if labels is not None:
            (staged / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
        if final.exists():
            os.rename(final, work / "previous")
        os.rename(staged, final)
        return final, version
    except OSError as exc:
        raise RepositoryError(f"cannot write {final}: {exc.strerror or exc}") from None


def write_naive_ensemble(repo: Path, name: str, expert_models: Sequence[str], image: TensorSpec, logits: TensorSpec,
                         labels: Sequence[str], opts: ServingOptions, overwrite: bool = False) -> Path:
    """The unfused serving baseline: Triton's ensemble scheduler fans the image out to K single-expert
    models and a python-backend step averages their logits (Triton has no built-in mean)."""
    from serve.backends import MEAN_MODEL

    k = len(expert_models)
    mean_inputs = [TensorSpec(f"logits_{i}", "FP32", logits.dims) for i in range(k)]
    mean_cfg = model_config(f"{name}_mean", "python", mean_inputs, [logits], replace(opts, warmup_batch_sizes=[]))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(MEAN_MODEL, Path(tmp) / "model.py")
        write_model(repo, mean_cfg, {"model.py": Path(tmp) / "model.py"}, labels, overwrite=overwrite)
    cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=opts.max_batch_size)
    cfg.input.add(name=image.name, data_type=getattr(pb, f"TYPE_{image.dtype}"), dims=image.dims,
                  format=getattr(pb.ModelInput, f"FORMAT_{image.format}") if image.format else 0)
    cfg.output.add(name=logits.name, data_type=pb.TYPE_FP32, dims=logits.dims, label_filename=LABELS_FILE)
    for i, model in enumerate(expert_models):
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map[image.name] = image.name
        step.output_map["logits"] = f"expert_logits_{i}"
    step = cfg.ensemble_scheduling.step.add(model_name=f"{name}_mean", model_version=-1)
    for i in range(k):
        step.input_map[f"logits_{i}"] = f"expert_logits_{i}"
    step.output_map["logits"] = logits.name
    model_dir, _ = write_model(repo, cfg, {}, labels, overwrite=overwrite)
    return model_dir
