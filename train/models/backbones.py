"""Trunks split into named stages, so experts can share the first stages and own the rest.

Key names follow torchvision (conv1, bn1, layerN.i.convJ, downsample) for the ImageNet trunks and
the LDAM/NCL/SHIKE ResNet-32 code for the CIFAR trunks, so official weights map by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.models.spec import CIFAR_ARCHS, ModelSpec

STEM_MODULES = ("conv1", "bn1", "relu", "maxpool")


class StagedBackbone(nn.Module):
    """A trunk whose forward can run any contiguous range of its stages."""

    stage_names: tuple[str, ...] = ()
    out_dim: int = 0

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "stem":
            for module_name in STEM_MODULES:
                module = getattr(self, module_name, None)
                if module is not None:
                    x = module(x)
            return x
        return getattr(self, name)(x)

    def present_stages(self) -> list[str]:
        return [s for s in self.stage_names if hasattr(self, "conv1" if s == "stem" else s)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage this module still owns, in order."""
        outputs = []
        for name in self.present_stages():
            x = self.run_stage(name, x)
            outputs.append(x)
        return outputs

    def keep_stages(self, names: list[str]) -> "StagedBackbone":
        """Drop the parameters of every stage not in `names` (shared trunk / expert branch split)."""
        for stage in self.stage_names:
            if stage in names:
                continue
            for module_name in (STEM_MODULES if stage == "stem" else (stage,)):
                if hasattr(self, module_name):
                    delattr(self, module_name)
        return self


class ShortcutA(nn.Module):
    """Option A: parameter-free stride-2 subsampling with zero-padded channels (NCL / LDAM)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(StagedBackbone):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, three stages of n BasicBlocks."""

    stage_names = ("stem", "layer1", "layer2", "layer3")
    out_dim = 64

    def __init__(self, depth: int, shortcut: str):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for index, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for b in range(blocks):
                stride = 2 if (b == 0 and index > 1) else 1
                layers.append(CifarBasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)


class TorchvisionTrunk(StagedBackbone):
    """A torchvision ResNet/ResNeXt without avgpool and fc, keeping torchvision's key names."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, arch: str):
        super().__init__()
        import torchvision  # here: importing it costs every CLI a second, and only these trunks need it
        net = getattr(torchvision.models, arch)(weights=None)
        for name in STEM_MODULES + ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.out_dim = net.fc.in_features


def build_backbone(spec: ModelSpec) -> StagedBackbone:
    if spec.arch in CIFAR_ARCHS:
        return CifarResNet(int(spec.arch.removeprefix("resnet")), spec.shortcut)
    return TorchvisionTrunk(spec.arch)


def stage_names(arch: str) -> tuple[str, ...]:
    return CifarResNet.stage_names if arch in CIFAR_ARCHS else TorchvisionTrunk.stage_names


def load_torchvision_weights(backbone: StagedBackbone, arch: str) -> None:
    """Load torchvision's ImageNet weights (downloaded on first use) into the stages this module owns."""
    import torchvision
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    state = {k: v for k, v in weights.get_state_dict(progress=True).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
