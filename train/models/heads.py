"""Classifier heads. Weights are stored [classes, features] like nn.Linear in every head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.spec import ModelSpec


class CosineHead(nn.Module):
    """NCL's cosine classifier: s * <x/|x|, w_c/|w_c|> + b_c with a learnable bias (init 0).

    The official code normalises without an epsilon; we add 1e-12 so a zero feature gives 0, not NaN.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float, bias: bool = True):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.scale * F.linear(F.normalize(x, dim=1, eps=1e-12), F.normalize(self.weight, dim=1, eps=1e-12))
        return logits if self.bias is None else logits + self.bias

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class NormedLinearHead(CosineHead):
    """SHIKE's NormedLinear (scale 30, no bias). Official weights are [in, out]: the converter transposes them.

    Initialised as the official code: uniform(-1, 1), then every class vector rescaled to norm 1 (renorm to
    1e-5, times 1e5). The forward is scale-invariant, but the weight norm sets the effective learning rate of
    a fresh head (stage 1 and cRT): a raw uniform vector of 64 entries has norm about 4.6.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__(in_features, num_classes, scale, bias=False)
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)


class LWSHead(nn.Module):
    """Learnable weight scaling: a frozen linear classifier times a learnable per-class scale."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.fc.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scales

    def folded(self) -> nn.Linear:
        """The equivalent nn.Linear with the scales folded in: W' = diag(s) W, b' = s * b."""
        linear = nn.Linear(self.fc.in_features, self.fc.out_features)
        with torch.no_grad():
            linear.weight.copy_(self.fc.weight * self.scales[:, None])
            linear.bias.copy_(self.fc.bias * self.scales)
        return linear


def build_head(spec: ModelSpec, in_features: int) -> nn.Module:
    if spec.head == "linear":
        return nn.Linear(in_features, spec.num_classes, bias=spec.head_bias)
    if spec.head == "cosine":
        return CosineHead(in_features, spec.num_classes, spec.head_scale, spec.head_bias)
    if spec.head == "normed":
        return NormedLinearHead(in_features, spec.num_classes, spec.head_scale)
    return LWSHead(in_features, spec.num_classes)
