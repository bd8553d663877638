"""The model spec: everything needed to rebuild a network from a checkpoint, and nothing else.

It is stored in every checkpoint as a plain dict (so `torch.load(weights_only=True)` reads it)
and is the single source of truth for architecture, experts, head, input size and normalization.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from expertfuse.errors import UserError

CIFAR_ARCHS = ("resnet32", "resnet20", "resnet8")
TORCHVISION_ARCHS = ("resnet50", "resnext50_32x4d", "resnet152")
ARCHS = CIFAR_ARCHS + TORCHVISION_ARCHS
HEADS = ("linear", "cosine", "normed", "lws")


@dataclass
class ModelSpec:
    arch: str = "resnet32"
    num_classes: int = 10
    num_experts: int = 3
    # Stages run once in a shared trunk before the experts branch off (0: fully separate experts, NCL).
    shared_stages: int = 0
    # Shortcut of the CIFAR ResNets: "A" (parameter-free, NCL) or "B" (1x1 conv + BN, SHIKE).
    shortcut: str = "A"
    head: str = "linear"
    head_scale: float = 16.0
    head_bias: bool = True
    # Depth-wise knowledge fusion of shallow trunk features into each expert (SHIKE); "" for none.
    fusion: str = ""
    # Names of the experts when they are not interchangeable (SSD: ["hard", "soft"] heads on one trunk).
    expert_names: list[str] = field(default_factory=list)
    input_size: int = 32
    # Test-time preprocessing: resize the shorter side to `resize`, center-crop `input_size`.
    resize: int = 32
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.head not in HEADS:
            raise UserError(f"unknown head {self.head!r}; choose from {', '.join(HEADS)}")
        if self.shortcut not in ("A", "B"):
            raise UserError(f"shortcut must be 'A' or 'B', not {self.shortcut!r}")
        if self.num_experts < 1 or self.num_classes < 2:
            raise UserError("a model needs at least 1 expert and 2 classes")
        if self.expert_names and len(self.expert_names) != self.num_experts:
            raise UserError(f"expert_names {self.expert_names} do not match num_experts {self.num_experts}")

    @property
    def layout(self) -> str:
        return "shared-trunk" if self.shared_stages else "separate"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"model spec has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def describe(self) -> str:
        return (f"{self.num_experts} x {self.arch} ({self.layout}), {self.head} head, "
                f"{self.num_classes} classes, input {self.input_size}x{self.input_size}")
