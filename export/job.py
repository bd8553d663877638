"""An export job: a loaded checkpoint plus a request, resolved into what to build (graph options, name)."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from expertfuse.contract import ModelMetadata
from expertfuse.errors import UserError
from export.graph import GraphOptions, parse_experts
from export.naming import default_name
from export.request import ExportRequest
from train.checkpoint import load_model
from train.methods import METHODS
from train.models import MultiExpertNet


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read once (bench builds several jobs from one)."""
    path: Path
    model: MultiExpertNet
    data: dict
    sha256: str

    @cached_property
    def model_float64(self) -> MultiExpertNet:
        """The network in float64: the export gate's reference (made once per checkpoint, on first use)."""
        return copy.deepcopy(self.model).double().eval()

    @classmethod
    def load(cls, path: Path) -> "LoadedCheckpoint":
        model, data = load_model(path)
        return cls(Path(path), model, data, hashlib.sha256(Path(path).read_bytes()).hexdigest())


@dataclass
class ExportJob:
    checkpoint: LoadedCheckpoint
    opts: GraphOptions
    name: str
    request: ExportRequest

    @property
    def model(self) -> MultiExpertNet:
        return self.checkpoint.model

    @property
    def spec(self):
        return self.model.spec

    @property
    def method(self) -> str:
        return self.checkpoint.data["method"]

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.data["classes"]

    def metadata(self, fusion: str, precision: str | None = None, extra: dict[str, str] | None = None) -> ModelMetadata:
        """What travels with the artifact (ONNX metadata_props) and its config (Triton parameters); INT8 and early
        exit name their precision and add their facts (gate result, threshold) as `extra`."""
        s = self.spec
        return ModelMetadata(classes=list(self.classes), mean=list(s.mean), std=list(s.std), input_size=s.input_size,
                             resize=s.resize, input_layout=self.opts.input_layout, experts=list(self.opts.experts),
                             fusion=fusion, precision=precision or ("fp16" if self.opts.fp16 else "fp32"),
                             arch=s.arch, method=self.method, checkpoint_sha256=self.checkpoint.sha256, extra=extra or {})


def chosen_experts(request: ExportRequest, model: MultiExpertNet, method: str) -> tuple[int, ...]:
    """--experts, or one named head (--head); when every expert is asked for, what the method serves
    (Method.served_experts: SSD its soft head, the others all of them)."""
    names = model.spec.expert_names
    if request.head:
        if request.head not in names:
            raise UserError(f"--head {request.head}: the checkpoint's heads are "
                            f"{', '.join(names) or 'unnamed (use --experts)'}")
        return (names.index(request.head),)
    served = METHODS[method].served_experts if method in METHODS else None
    if served is not None and request.experts == "all":
        return served
    return parse_experts(request.experts, model.num_experts)


def build_job(request: ExportRequest, checkpoint: LoadedCheckpoint | None = None, suffix: str = "") -> ExportJob:
    """The job of a (validated) request; the checkpoint is loaded unless one is given."""
    checkpoint = checkpoint or LoadedCheckpoint.load(request.ckpt)
    model = checkpoint.model
    experts = chosen_experts(request, model, checkpoint.data["method"])
    name = request.name or default_name(checkpoint.data["method"], experts, model.num_experts, request.fp16, suffix,
                                        model.spec.expert_names)
    opts = GraphOptions(experts, request.fusion, request.input_layout, request.probs, request.expert_logits, request.fp16)
    return ExportJob(checkpoint, opts, name, request)


def job_for(ckpt: Path | LoadedCheckpoint, experts: str = "all", fusion: str = "loop", *, probs: bool = False,
            expert_logits: bool = False, max_batch: int = 256) -> ExportJob:
    """An FP32 uint8-NHWC job without a command line (bench and tests); pass a LoadedCheckpoint to reuse one."""
    loaded = ckpt if isinstance(ckpt, LoadedCheckpoint) else LoadedCheckpoint.load(Path(ckpt))
    request = ExportRequest(ckpt=loaded.path, experts=experts, fusion=fusion, probs=probs,
                            expert_logits=expert_logits, max_batch=max_batch)
    return build_job(request, loaded)


def with_experts(job: ExportJob, experts: tuple[int, ...], fusion: str, name: str) -> ExportJob:
    """The same job restricted to some experts (the naive ensemble's single-expert models)."""
    return replace(job, name=name, opts=replace(job.opts, experts=experts, fusion=fusion))
