"""Augmentation presets (torchvision.transforms.v2) and the test-time preprocessing of an image.

`eval_transform(spec)` is test-time preprocessing: expertfuse.preprocess's pixel transform (resize the
shorter side, center crop), then scale to [0, 1] and normalize with spec.mean/std. Exported graphs
fold the normalization in and clients apply the same pixel transform.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from expertfuse import preprocess
from expertfuse.errors import UserError
from train.models.spec import ModelSpec

AUGMENTATIONS = ("cifar", "cifar-basic", "imagenet", "none")


class Cutout(torch.nn.Module):
    """Zero one size x size square whose centre is uniform over the image (DeVries & Taylor;
    the square may be clipped at the border), as in NCL/SHIKE's CIFAR pipeline."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        half = self.size // 2
        image = image.clone()
        image[..., max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = 0
        return image


def train_transform(name: str, spec: ModelSpec) -> v2.Compose:
    size = spec.input_size
    if name == "cifar":
        ops = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
               v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128),
               v2.ToDtype(torch.float32, scale=True), Cutout(16), v2.Normalize(spec.mean, spec.std)]
        return v2.Compose([v2.ToImage(), *ops])
    if name == "cifar-basic":
        return v2.Compose([v2.ToImage(), v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                           *preprocess.normalize_ops(spec.mean, spec.std)])
    if name == "imagenet":
        # torchvision's RandAugment has no magnitude std (timm's mstd0.5): the closest documented match.
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4, 0.0),
                           v2.RandAugment(num_ops=2, magnitude=10), *preprocess.normalize_ops(spec.mean, spec.std)])
    if name == "none":
        return eval_transform(spec)
    raise UserError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")


def eval_transform(spec: ModelSpec) -> v2.Compose:
    return preprocess.eval_transform(spec.resize, spec.input_size, spec.mean, spec.std)
