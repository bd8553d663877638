"""The inference graph: raw pixels in, averaged expert logits out.

  image (UINT8 [B,H,W,3] or FP32 [B,3,H,W] pixels 0..255)
    -> normalize with the checkpoint's mean/std (folded into the graph)
    -> experts (`loop`: one after another; `grouped`: horizontally fused) -> mean
    -> logits [B,C] (+ probs [B,C], expert_logits [B,K,C] when asked)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from expertfuse.contract import INPUT_LAYOUTS
from expertfuse.errors import UserError
from expertfuse.preprocess import folded_normalization, normalize_pixels
from export.fusion import GroupedExperts
from train.models import MultiExpertNet

FUSIONS = ("loop", "grouped")


@dataclass(frozen=True)
class GraphOptions:
    experts: tuple[int, ...]
    fusion: str = "loop"
    input_layout: str = "uint8-nhwc"
    probs: bool = False
    expert_logits: bool = False
    fp16: bool = False

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + (["probs"] if self.probs else []) + (["expert_logits"] if self.expert_logits else [])


def parse_experts(text: str, num_experts: int) -> tuple[int, ...]:
    """'all' | '0' | '0,2' -> expert indices, validated against the checkpoint."""
    if text == "all":
        return tuple(range(num_experts))
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--experts must be 'all' or comma-separated indices, not {text!r}") from None
    bad = [e for e in chosen if not 0 <= e < num_experts]
    if bad or len(set(chosen)) != len(chosen):
        raise UserError(f"--experts {text}: the checkpoint has experts 0..{num_experts - 1} (each once)")
    return chosen


def select_experts(model: MultiExpertNet, experts: tuple[int, ...]) -> MultiExpertNet:
    """A copy of the network holding only the chosen experts (the shared trunk stays)."""
    subset = copy.deepcopy(model)
    subset.experts = nn.ModuleList(subset.experts[i] for i in experts)
    return subset.eval()


class Normalize(nn.Module):
    """Pixels 0..255 (uint8 NHWC or float NCHW) -> (x/255 - mean)/std as float NCHW, one multiply-add."""

    def __init__(self, mean: list[float], std: list[float], layout: str):
        super().__init__()
        if layout not in INPUT_LAYOUTS:
            raise UserError(f"--input must be one of {', '.join(INPUT_LAYOUTS)}")
        self.nhwc = layout == "uint8-nhwc"
        scale, shift = folded_normalization(mean, std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            image = image.permute(0, 3, 1, 2)
        return image.to(torch.float32) * self.scale - self.shift


class InferenceGraph(nn.Module):
    def __init__(self, model: MultiExpertNet, opts: GraphOptions):
        super().__init__()
        spec = model.spec
        self.opts = opts
        self.normalize = Normalize(spec.mean, spec.std, opts.input_layout)
        subset = select_experts(model, opts.experts)
        if opts.fusion == "loop":
            self.experts = subset
        elif opts.fusion == "grouped":
            self.experts = GroupedExperts(subset, fold_mean=not opts.expert_logits)
        else:
            raise UserError(f"--fusion must be one of {', '.join(FUSIONS)} (or auto), not {opts.fusion!r}")
        self.per_expert = opts.fusion == "loop" or opts.expert_logits
        if opts.fp16:
            self.experts.half()

    def forward(self, image: torch.Tensor):
        x = self.normalize(image)
        if self.opts.fp16:
            x = x.half()
        out = self.experts(x)
        per_expert = out.float() if self.per_expert else None
        logits = per_expert.mean(1) if self.per_expert else out.float()
        outputs = [logits]
        if self.opts.probs:
            outputs.append(logits.softmax(1))
        if self.opts.expert_logits:
            outputs.append(per_expert)
        return tuple(outputs) if len(outputs) > 1 else logits


@torch.no_grad()
def expert_reference_logits(model: MultiExpertNet, experts: tuple[int, ...], images: torch.Tensor,
                            layout: str) -> torch.Tensor:
    """The chosen experts' logits [B, K, C] from the training network, with the test-time normalization of
    expertfuse.preprocess applied to the same pixels, in the model's precision (float32, or float64 for a model
    cast with .double(): the export gate's reference)."""
    dtype = next(model.parameters()).dtype
    x = normalize_pixels(images, model.spec.mean, model.spec.std, layout, dtype)
    return model.eval()(x, experts=list(experts))


def reference_logits(model: MultiExpertNet, experts: tuple[int, ...], images: torch.Tensor,
                     layout: str) -> torch.Tensor:
    """What every export must reproduce: the mean of the chosen experts' logits."""
    return expert_reference_logits(model, experts, images, layout).mean(1)
