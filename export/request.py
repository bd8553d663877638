"""What the user asked an export to do: the command-line flags shared by export.onnx and export.trt,
parsed into one `ExportRequest` and validated (arguments and output location) before any export work."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import onnx
import torch

from expertfuse.cli import int_list
from expertfuse.contract import INPUT_LAYOUTS, check_model_name
from expertfuse.errors import UserError
from expertfuse.parity import EXPORT_FP16, EXPORT_FP32, Tolerance
from serve.repository import RepositoryError, version_policy

# torch.onnx's dynamo exporter builds opset 18 graphs; a lower opset needs a down-conversion it cannot always do
# (it then keeps 18 and logs tracebacks), a higher one is an up-conversion onnx knows how to do.
MIN_OPSET = 18
DEFAULT_OPSET = 18


def version_policy_arg(text: str) -> str:
    """argparse type: a Triton version policy, checked by the repository writer's own parser."""
    try:
        version_policy(text)
    except RepositoryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass
class ExportRequest:
    """The shared export settings (flags of export.onnx and export.trt), independent of argparse."""
    ckpt: Path
    out: Path = Path("model_repository")
    name: str | None = None
    experts: str = "all"
    head: str | None = None
    fusion: str = "auto"
    input_layout: str = "uint8-nhwc"
    max_batch: int = 64
    probs: bool = False
    expert_logits: bool = False
    fp16: bool = False
    overwrite: bool = False
    parity_factor: float | None = None  # None: the named tolerance's (expertfuse.parity.EXPORT_FP32)
    opset: int = DEFAULT_OPSET
    instance_kind: str | None = None  # cpu | gpu; None: gpu when CUDA is visible
    instance_count: int = 1
    gpus: list[int] = field(default_factory=list)
    max_queue_delay_us: int = 100
    preferred_batch_sizes: list[int] = field(default_factory=list)
    version_policy: str = "latest:1"

    @property
    def kind(self) -> str:
        return self.instance_kind or ("gpu" if torch.cuda.is_available() else "cpu")

    def tolerance(self) -> Tolerance:
        """The export gate: EXPORT_FP16 for FP16 graphs, else EXPORT_FP32 with --parity-factor overriding its factor."""
        if self.fp16:
            return EXPORT_FP16
        return EXPORT_FP32 if self.parity_factor is None else replace(EXPORT_FP32, factor=self.parity_factor)


def add_request_args(p: argparse.ArgumentParser, default_max_batch: int | None) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="training checkpoint (.pt)")
    p.add_argument("--out", "--model-repository", dest="out", type=Path, default=Path("model_repository"),
                   help="model repository [model_repository]")
    p.add_argument("--name", help="model name (default from the checkpoint: ncl, ncl_expert0, ncl_trt, ...)")
    p.add_argument("--experts", default="all", help="all | 0 | 0,2 [all]")
    p.add_argument("--head", help="serve one named head of the checkpoint (SSD: soft | hard; default soft)")
    p.add_argument("--fusion", default="auto", choices=["loop", "grouped", "auto"],
                   help="how experts run in the graph; auto measures both on the target [auto]")
    p.add_argument("--input", dest="input_layout", default="uint8-nhwc", choices=INPUT_LAYOUTS,
                   help="graph input: UINT8 [B,H,W,3] or FP32 [B,3,H,W], pixels 0..255 [uint8-nhwc]")
    p.add_argument("--max-batch", type=int, default=default_max_batch,
                   help=f"Triton max_batch_size [{default_max_batch or 'the largest profile'}]")
    p.add_argument("--probs", action="store_true", help="also output softmax probabilities")
    p.add_argument("--expert-logits", action="store_true", help="also output every expert's logits [B,K,C]")
    p.add_argument("--fp16", action="store_true", help="FP16 graph with FP32 inputs/outputs")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder instead of adding a version")
    p.add_argument("--parity-factor", type=float,
                   help="FP32 parity: how many times PyTorch float32's own error (against float64) the graph's error "
                        f"may be [{EXPORT_FP32.factor:g}]")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} or later [{DEFAULT_OPSET}]")
    p.add_argument("--instance-kind", choices=["cpu", "gpu"], help="Triton instance kind (default: gpu if CUDA)")
    p.add_argument("--instance-count", type=int, default=1, help="Triton model instances [1]")
    p.add_argument("--gpus", type=int_list, default=[], help="GPU ids of the instances, e.g. 0,1 (default: all)")
    p.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batching queue delay [100]")
    p.add_argument("--preferred-batch-sizes", type=int_list, default=[],
                   help="dynamic batching's preferred batch sizes, e.g. 16,32 (default: none)")
    p.add_argument("--version-policy", type=version_policy_arg, default="latest:1",
                   help="which versions Triton serves: latest:N | all | specific:1,3 [latest:1]")


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The ExportRequest of parsed flags (the stage-specific flags stay with their stage)."""
    return ExportRequest(**{f.name: getattr(args, f.name) for f in fields(ExportRequest)})


def validate(request: ExportRequest) -> ExportRequest:
    """Every check that needs no checkpoint and no export work; a UserError names the first problem."""
    if request.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if any(not 1 <= b <= request.max_batch for b in request.preferred_batch_sizes):
        raise UserError(f"--preferred-batch-sizes {request.preferred_batch_sizes} must lie in 1..--max-batch "
                        f"{request.max_batch}")
    if request.instance_count < 1:
        raise UserError("--instance-count must be at least 1")
    if request.max_queue_delay_us < 0:
        raise UserError("--max-queue-delay-us must be 0 or more")
    if request.gpus and request.kind != "gpu":
        raise UserError("--gpus applies to GPU instances only; add --instance-kind gpu")
    if any(g < 0 for g in request.gpus):
        raise UserError(f"--gpus {request.gpus}: GPU ids are 0 or more")
    if request.parity_factor is not None and not request.parity_factor >= 0:
        raise UserError("--parity-factor must be 0 or more")
    if request.fp16 and request.parity_factor is not None:
        raise UserError(f"--parity-factor judges FP32 exports; FP16 is judged by {EXPORT_FP16.describe()}")
    check_opset(request.opset)
    if request.name is not None:
        check_model_name(request.name)
    check_output_location(request.out)
    return request


def check_opset(opset: int) -> int:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset}: torch.onnx's exporter writes opsets {MIN_OPSET}..{newest} "
                        f"(the installed onnx's newest); use one of those")
    return opset


def check_output_location(repo: Path) -> Path:
    """The repository must be a folder we can create or write into."""
    if repo.exists() and not repo.is_dir():
        raise UserError(f"cannot write the model repository {repo}: it is a file, not a folder")
    ancestor = repo
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write the model repository {repo}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the model repository {repo}: {ancestor} is not writable")
    return repo
