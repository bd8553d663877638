"""The model contract: what every exported model looks like from outside, written once.

Exported graphs take `image` (UINT8 [B,H,W,3] or FP32 [B,3,H,W] pixels 0..255) and return `logits`
[B,C] (plus `probs` and `expert_logits` [B,K,C] when asked). `ModelMetadata` is what export stores
in the artifact (ONNX metadata_props) and in config.pbtxt parameters, and what the client, serve
and bench read back: one dataclass, one key scheme (`expertfuse_<field>`), to and from both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

from expertfuse.errors import UserError

INPUT = "image"
LOGITS = "logits"
PROBS = "probs"
EXPERT_LOGITS = "expert_logits"
EXPERTS_RUN = "experts_run"  # early-exit models: how many experts each image went through

INPUT_LAYOUTS = ("uint8-nhwc", "float-nchw")
# graph input layout -> (Triton data type, Triton image format)
TRITON_INPUT = {"uint8-nhwc": ("UINT8", "NHWC"), "float-nchw": ("FP32", "NCHW")}
PRECISIONS = ("fp32", "fp16", "int8")

KEY_PREFIX = "expertfuse_"
# What Triton accepts as a model name (a folder name it also puts in URLs and the python-backend stub's argv).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_model_name(name: str) -> str:
    """The name, or a UserError saying why Triton could not serve a model of that name."""
    if not _MODEL_NAME.fullmatch(name or "") or len(name) > 128:
        raise UserError(f"model name {name!r} cannot be served by Triton: use letters, digits, '_', '-' and '.', "
                        "starting with a letter, digit or '_' (at most 128 characters)")
    return name


@dataclass
class ModelMetadata:
    """The facts about an exported model that travel with it (artifact properties and Triton parameters)."""
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    resize: int
    input_layout: str = "uint8-nhwc"
    experts: list[int] = field(default_factory=list)
    fusion: str = "loop"
    precision: str = "fp32"
    arch: str = ""
    method: str = ""
    checkpoint_sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # e.g. an INT8 gate's result, early-exit threshold

    def to_properties(self) -> dict[str, str]:
        """Every field as `expertfuse_<field>` -> string (lists and dicts as JSON)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update({KEY_PREFIX + k: str(v) for k, v in value.items()})
            else:
                out[KEY_PREFIX + f.name] = value if isinstance(value, str) else json.dumps(value)
        return out

    def triton_parameters(self) -> dict[str, str]:
        """The properties minus the class names (labels.txt carries those)."""
        return {k: v for k, v in self.to_properties().items() if k != KEY_PREFIX + "classes"}

    @classmethod
    def from_properties(cls, props: dict[str, str], classes: list[str] | None = None) -> "ModelMetadata":
        """Read properties written by to_properties (ONNX metadata_props or Triton parameters)."""
        known = {f.name: f for f in fields(cls)}
        values, extra = {}, {}
        for key, text in props.items():
            if not key.startswith(KEY_PREFIX):
                continue
            name = key[len(KEY_PREFIX):]
            if name in known and name != "extra":
                values[name] = text if known[name].type == "str" else json.loads(text)
            else:
                extra[name] = text
        if classes is not None:
            values["classes"] = list(classes)
        missing = [n for n in ("classes", "mean", "std", "input_size", "resize") if n not in values]
        if missing:
            raise UserError(f"model metadata lacks {', '.join(KEY_PREFIX + m for m in missing)}; re-export the model")
        return cls(**values, extra=extra)

