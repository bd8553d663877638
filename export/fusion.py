"""Horizontal fusion of K same-architecture experts into one network (HFTA/NetFuse style, inference only).

Experts' channels are stacked expert-major on one axis ([B, K*C, H, W]):
- BatchNorm is folded into each convolution;
- a convolution that reads the shared input (the image, or the shared trunk's output) becomes one
  convolution with K*Cout outputs; every later convolution becomes a grouped one (groups = K*g);
- parameter-free option-A shortcuts and identity shortcuts over a shared input become 1x1 convolutions
  with 0/1 weights, which copy values exactly;
- SHIKE's shallow aligners are fused per source stage the same way, then multiplied into the deep features;
- the heads become one linear layer over [B, K*D]; with the mean folded in (weights / K) it returns
  the ensemble logits directly, otherwise a block-diagonal layer returns every expert's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertfuse.errors import UserError
from train.models.backbones import ShortcutA
from train.models.heads import CosineHead, LWSHead
from train.models.multi_expert import MultiExpertNet


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def fuse_convs(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], shared_input: bool) -> nn.Conv2d:
    """K (conv, bn) pairs -> one conv over the shared input (K*Cout outputs) or over stacked inputs (grouped)."""
    conv, k = pairs[0][0], len(pairs)
    if shared_input and conv.groups != 1:
        raise UserError("cannot fuse a grouped convolution that reads a shared input")
    weights, biases = zip(*(fold_bn(c, b) for c, b in pairs))
    fused = nn.Conv2d(conv.in_channels * (1 if shared_input else k), conv.out_channels * k, conv.kernel_size,
                      conv.stride, conv.padding, conv.dilation, conv.groups * (1 if shared_input else k), bias=True)
    with torch.no_grad():
        fused.weight.copy_(torch.cat(weights))
        fused.bias.copy_(torch.cat(biases))
    return fused


def selection_conv(in_channels: int, out_channels: int, stride: int, offset: int, k: int, shared_input: bool) -> nn.Conv2d:
    """A 1x1 conv that copies input channel i to output channel offset + i (zeros elsewhere), per expert:
    the identity, or option A's stride-2 subsample with zero-padded channels."""
    conv = nn.Conv2d(in_channels * (1 if shared_input else k), out_channels * k, 1, stride, bias=False,
                     groups=1 if shared_input else k)
    weight = torch.zeros(out_channels, in_channels, 1, 1)
    weight[torch.arange(in_channels) + offset, torch.arange(in_channels)] = 1.0
    with torch.no_grad():
        conv.weight.copy_(weight.repeat(k, 1, 1, 1))
    return conv


class FusedBlock(nn.Module):
    """relu(conv_n(...relu(conv_1(x))) + shortcut(x)) over stacked expert channels."""

    def __init__(self, convs: list[nn.Conv2d], shortcut: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = F.relu(out)
        return F.relu(out + self.shortcut(x))


def _shortcut_of(block: nn.Module) -> nn.Module | None:
    return block.shortcut if hasattr(block, "shortcut") else block.downsample


def fuse_block(blocks: list[nn.Module], shared_input: bool) -> FusedBlock:
    """K residual blocks (CIFAR BasicBlock or torchvision Bottleneck) -> one FusedBlock."""
    depth = 3 if hasattr(blocks[0], "conv3") else 2
    convs = [fuse_convs([(getattr(b, f"conv{i}"), getattr(b, f"bn{i}")) for b in blocks], shared_input and i == 1)
             for i in range(1, depth + 1)]
    first, k = blocks[0], len(blocks)
    short = _shortcut_of(first)
    if isinstance(short, nn.Sequential):  # conv + BN (option B, torchvision downsample)
        shortcut = fuse_convs([(_shortcut_of(b)[0], _shortcut_of(b)[1]) for b in blocks], shared_input)
    elif isinstance(short, ShortcutA):
        planes = first.conv2.out_channels
        shortcut = selection_conv(first.conv1.in_channels, planes, 2, short.pad, k, shared_input)
    elif shared_input:
        channels = first.conv1.in_channels
        shortcut = selection_conv(channels, channels, 1, 0, k, shared_input=True)
    else:
        shortcut = nn.Identity()
    return FusedBlock(convs, shortcut)


class FusedHead(nn.Module):
    """All experts' heads as one linear layer over [B, K*D] (cosine heads normalise each expert's features)."""

    def __init__(self, heads: list[nn.Module], feature_dim: int, fold_mean: bool):
        super().__init__()
        k = len(heads)
        self.k, self.feature_dim, self.fold_mean = k, feature_dim, fold_mean
        self.normalize = isinstance(heads[0], CosineHead)
        weights, biases = [], []
        for head in heads:
            if isinstance(head, LWSHead):
                head = head.folded()
            w = head.weight.detach()
            if self.normalize:
                w = F.normalize(w, dim=1, eps=1e-12) * head.scale
            weights.append(w)
            biases.append(head.bias.detach() if head.bias is not None else torch.zeros(w.shape[0]))
        classes = weights[0].shape[0]
        if fold_mean:
            self.linear = nn.Linear(k * feature_dim, classes)
            weight, bias = torch.cat(weights, dim=1) / k, torch.stack(biases).mean(0)
        else:
            self.linear = nn.Linear(k * feature_dim, k * classes)
            weight, bias = torch.block_diag(*weights), torch.cat(biases)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features.reshape(-1, self.k, self.feature_dim), dim=2, eps=1e-12)
            features = features.reshape(-1, self.k * self.feature_dim)
        out = self.linear(features)
        return out if self.fold_mean else out.reshape(-1, self.k, out.shape[1] // self.k)


class FusedAligners(nn.Module):
    """SHIKE's per-expert shallow aligners, fused per source stage (experts reading the same trunk output
    share an aligner depth): the first unit reads the shared feature, later units are grouped. The
    groups' outputs are concatenated and put back in expert order with one channel gather."""

    def __init__(self, experts: list[nn.Module], channels: int):
        super().__init__()
        self.sources = sorted({e.source for e in experts})
        groups, order = [], []
        for source in self.sources:
            members = [i for i, e in enumerate(experts) if e.source == source]
            order += members
            units = experts[members[0]].fusion.units
            groups.append(nn.ModuleList(
                fuse_convs([(experts[m].fusion.units[k][0], experts[m].fusion.units[k][1]) for m in members],
                           shared_input=k == 0) for k in range(len(units))))
        self.groups = nn.ModuleList(groups)
        position = {expert: slot for slot, expert in enumerate(order)}
        index = [position[e] * channels + c for e in range(len(experts)) for c in range(channels)]
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, trunk_outputs: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for source, units in zip(self.sources, self.groups):
            x = trunk_outputs[source]
            for k, conv in enumerate(units):
                x = conv(x)
                if k != 1:  # the aligner's ReLU rule
                    x = F.relu(x)
            parts.append(x)
        return torch.cat(parts, dim=1).index_select(1, self.index)


class GroupedExperts(nn.Module):
    """The fused network: shared trunk (run once) -> fused expert stages -> pooled -> fused heads.

    forward() returns the ensemble logits [B, C] when `fold_mean`, else every expert's logits [B, K, C].
    """

    def __init__(self, model: MultiExpertNet, fold_mean: bool = True):
        super().__init__()
        self.trunk = model.trunk
        backbones = [e.backbone for e in model.experts]
        layers: list[nn.Module] = []
        shared = True  # the first fused op reads the image or the shared trunk's output
        for stage in backbones[0].present_stages():
            if stage == "stem":
                layers.append(fuse_convs([(b.conv1, b.bn1) for b in backbones], shared_input=True))
                layers.append(nn.ReLU())
                if getattr(backbones[0], "maxpool", None) is not None:
                    layers.append(backbones[0].maxpool)
            else:
                for i in range(len(getattr(backbones[0], stage))):
                    layers.append(fuse_block([getattr(b, stage)[i] for b in backbones], shared))
                    shared = False
            shared = False
        self.body = nn.Sequential(*layers)
        self.tile = 1 if layers else len(backbones)  # heads-only experts all read the trunk's one feature
        self.aligners = FusedAligners(list(model.experts), backbones[0].out_dim) if model.spec.fusion else None
        self.head = FusedHead([e.head for e in model.experts], backbones[0].out_dim, fold_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk_outputs = self.trunk(x) if self.trunk is not None else [x]
        deep = self.body(trunk_outputs[-1])
        if self.aligners is not None:
            deep = deep * self.aligners(trunk_outputs)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(deep, 1), 1).repeat(1, self.tile))
