"""SHIKE's depth-wise knowledge fusion (DKF): each expert fuses a shallow trunk feature into its deep one.

Expert e reads shallow trunk stage (e mod S) + 1, where S is the number of shared stages after the
stem (CIFAR ResNet-32 with stem, layer1, layer2 shared: expert 0 <- layer1, 1 <- layer2, 2 <- layer1).
An aligner of stride-2 3x3 conv + BN units, each doubling the channels (ReLU after every unit except
unit 1), brings it to the deep feature's shape; fusion is their element-wise product, then pooling.
On ResNet-50-class trunks (layer4 per expert) the sources cycle through layer1..layer3.
Aligners keep PyTorch's default initialisation, as in the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.backbones import StagedBackbone


def stage_channels(backbone: StagedBackbone, stage: str) -> int:
    if stage == "stem":
        return backbone.conv1.out_channels
    last = getattr(backbone, stage)[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def dkf_source(expert: int, shared_stages: int) -> int:
    """Index into the trunk's stage outputs [stem, layer1, ...] of the shallow feature expert `expert` reads."""
    return expert % (shared_stages - 1) + 1


class ShallowAligner(nn.Module):
    def __init__(self, in_channels: int, depth: int):
        super().__init__()
        units, channels = [], in_channels
        for _ in range(depth):
            units.append(nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * channels)))
            channels *= 2
        self.units = nn.ModuleList(units)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, unit in enumerate(self.units):
            x = unit(x)
            if k != 1:  # the official rule: ReLU unless unit index 1
                x = F.relu(x)
        return x
