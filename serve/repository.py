"""The Triton model repository writer: the one place config.pbtxt files are produced.

Configs are built as `model_config_pb2.ModelConfig` messages and rendered with protobuf's text
format, so everything written parses back (tests do exactly that). Every export publishes its set of
models as one unit through `publish_models` (staged beside the repository, renamed in under a lock
after a journal's commit point), so a failure or a kill leaves the repository as it was or complete.
"""
from __future__ import annotations

import contextlib
import json
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
from expertfuse.files import file_lock, write_text

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
    stale = _stale_staging(repo)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _stale_staging(repo: Path) -> list[Path]:
    pattern = re.compile(re.escape(_staging_prefix(repo)) + r"(\d+)-")
    return [p for p in repo.parent.glob(_staging_prefix(repo) + "*")
            if (m := pattern.match(p.name)) and p.is_dir() and not _alive(int(m.group(1)))]


@contextlib.contextmanager
def staging(repo: Path) -> Iterator[Path]:
    """A work folder beside the repository (Triton would take a folder inside it for a model), named with our pid
    so that the next writer removes it if we are killed; removed when the block ends."""
    repo = Path(repo).absolute()
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
        _tidy(repo)
        folder = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(repo)}{os.getpid()}-", dir=repo.parent))
    except OSError as exc:
        raise RepositoryError(f"cannot write the model repository {repo}: {exc.strerror or exc}") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class StagedModel:
    """A model ready to publish: its config, its artifacts (file name -> staged file or folder, moved in at publish)
    and its labels."""
    cfg: pb.ModelConfig
    artifacts: dict[str, Path] = field(default_factory=dict)
    labels: Sequence[str] | None = None


PUBLISH_LOCK = ".publish.lock"  # flock'ed around every publish into the repository
JOURNAL = ".publish-journal.json"  # a publish past its commit point: the staged folders still to rename in


def publish_models(repo: Path, models: Sequence[StagedModel], overwrite: bool = False) -> list[tuple[Path, int]]:
    """Add a version of every model in `models` to `repo` as one unit; returns (model folder, version) of each.

    One export writes a set that refers to itself (an ensemble names its members and must agree with their max
    batch), so models renamed in one by one would leave a set Triton refuses if the writer died in between. Under
    the repository's lock (flock on <repo>/.publish.lock: writers take turns, the kernel drops it if one dies), each
    model's whole new folder is staged beside the repository (earlier versions hard-linked, unless `overwrite`), its
    version number taken there, so never reused, and an ensemble's steps pinned to the versions of the members
    published with it. Writing the journal that names these folders is the commit point; the renames follow. A
    writer killed before it leaves the repository as it was; one killed after leaves the journal, which the next
    writer, or serve, rolls forward under the lock (`finish_publish`): readers see the old set or the whole new one.
    """
    repo = Path(repo).absolute()
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RepositoryError(f"cannot write the model repository {repo}: {exc.strerror or exc}") from None
    with staging(repo) as work, _locked(repo):
        try:
            _roll_forward(repo)
            pinned = {m.cfg.name: 1 if overwrite else max(versions(repo / m.cfg.name), default=0) + 1 for m in models}
            for model in models:
                _stage_folder(repo / model.cfg.name, work / "new" / model.cfg.name, model, pinned, overwrite)
            (work / "journal.json").write_text(json.dumps({"staging": work.name, "models": list(pinned)}))
            os.rename(work / "journal.json", repo / JOURNAL)
            _roll_forward(repo)
        except OSError as exc:
            raise RepositoryError(f"cannot write the model repository {repo}: {exc.strerror or exc}") from None
    return [(repo / name, version) for name, version in pinned.items()]


def write_model(repo: Path, cfg: pb.ModelConfig, artifacts: dict[str, Path], labels: Sequence[str] | None = None,
                overwrite: bool = False) -> tuple[Path, int]:
    """Publish one model (publish_models); a re-export adds a version, `overwrite` replaces the model folder."""
    return publish_models(repo, [StagedModel(cfg, artifacts, labels)], overwrite)[0]


def finish_publish(repo: Path) -> None:
    """Complete a publish whose writer died past its commit point (serve calls this before reading `repo`)."""
    repo = Path(repo).absolute()
    if (repo / JOURNAL).exists():
        with _locked(repo):
            _roll_forward(repo)


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[None]:
    """The repository's publish lock, waited for."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(repo / PUBLISH_LOCK))
        except OSError as exc:
            raise RepositoryError(f"cannot lock the model repository {repo}: {exc.strerror or exc}") from None
        yield


def _tidy(repo: Path) -> None:
    """Before a writer stages: finish a publish a dead writer left, then remove dead writers' staging folders (the
    journal's folders among them, so in that order, under the lock). A clean repository is not touched."""
    if not repo.is_dir():  # never published: no journal
        remove_stale_staging(repo)
    elif _stale_staging(repo) or (repo / JOURNAL).exists():
        with _locked(repo):
            _roll_forward(repo)
            remove_stale_staging(repo)


def _roll_forward(repo: Path) -> None:
    """Rename in every staged folder the journal names that is still staged (the old folder moved aside first);
    each step can be redone, so a writer killed here leaves a journal that still completes. Caller holds the lock."""
    journal = repo / JOURNAL
    if not journal.exists():
        return
    record = json.loads(journal.read_text())
    work = repo.parent / record["staging"]
    (work / "old").mkdir(parents=True, exist_ok=True)
    for name in record["models"]:
        staged, final = work / "new" / name, repo / name
        if staged.exists():
            if final.exists():
                os.rename(final, work / "old" / name)
            os.rename(staged, final)
    journal.unlink()


def _stage_folder(final: Path, staged: Path, model: StagedModel, pinned: dict[str, int], overwrite: bool) -> None:
    """The model's whole new folder: earlier versions hard-linked (no copy, the live folder stays intact), the new
    version with its artifacts moved in, its config (ensemble steps on models of this publish pinned) and labels."""
    staged.mkdir(parents=True)
    for v in [] if overwrite else versions(final):
        shutil.copytree(final / str(v), staged / str(v), copy_function=os.link)
    (staged / str(pinned[model.cfg.name])).mkdir()
    for name, source in model.artifacts.items():
        shutil.move(str(source), staged / str(pinned[model.cfg.name]) / name)
    cfg = pb.ModelConfig()
    cfg.CopyFrom(model.cfg)
    for step in cfg.ensemble_scheduling.step:
        step.model_version = pinned.get(step.model_name, step.model_version)
    write_config(staged, cfg)
    if model.labels is not None:
        (staged / LABELS_FILE).write_text("".join(f"{label}\n" for label in model.labels))


def naive_ensemble_models(name: str, expert_models: Sequence[str], image: TensorSpec, logits: TensorSpec,
                          labels: Sequence[str], opts: ServingOptions, work: Path) -> list[StagedModel]:
    """The unfused serving baseline, to publish with its experts: Triton's ensemble scheduler fans the image out to
    K single-expert models and a python-backend step (`<name>_mean`, Triton has no built-in mean) averages their
    logits."""
    from serve.backends import MEAN_MODEL

    k = len(expert_models)
    mean_inputs = [TensorSpec(f"logits_{i}", "FP32", logits.dims) for i in range(k)]
    mean_cfg = model_config(f"{name}_mean", "python", mean_inputs, [logits], replace(opts, warmup_batch_sizes=[]))
    shutil.copy(MEAN_MODEL, work / "model.py")
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
    return [StagedModel(mean_cfg, {"model.py": work / "model.py"}, labels), StagedModel(cfg, {}, labels)]
