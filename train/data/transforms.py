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

AUGMENTATIONS = ("cifar", "cifar-basic", "imagenet", "imagenet-basic", "mocov2", "ncl-sim", "none")
# SimCLR's blur: sigma uniform in [0.1, 2] (the official code's PIL blur); a 13-pixel kernel reaches 3 sigma.
BLUR = v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))


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
    """A named augmentation, ending in a normalized float tensor:
    cifar: crop (pad 4) + flip + AutoAugment CIFAR10 policy + Cutout 16 (NCL, SHIKE); cifar-basic: crop + flip;
    imagenet: random resized crop + flip + colour jitter + RandAugment(2, 10) (NCL ImageNet-LT, iNat);
    imagenet-basic: random resized crop + colour jitter + flip (SSD's stages);
    mocov2: MoCo-v2's key view, also NCL's contrastive CIFAR key view at 32 px (crop 0.2-1, jitter with
    p 0.8, grayscale 0.2, blur 0.5, flip); ncl-sim: both views of NCL's Places-LT MoCo branch (crop 0.08-1,
    jitter always, grayscale 0.2, blur 0.5, flip); none: test-time preprocessing."""
    size, normalize = spec.input_size, preprocess.normalize_ops(spec.mean, spec.std)
    if name == "cifar":
        ops = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
               v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128),
               v2.ToDtype(torch.float32, scale=True), Cutout(16), v2.Normalize(spec.mean, spec.std)]
        return v2.Compose([v2.ToImage(), *ops])
    if name == "cifar-basic":
        return v2.Compose([v2.ToImage(), v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(), *normalize])
    if name in ("imagenet", "imagenet-basic"):
        # torchvision's RandAugment has no magnitude std (timm's mstd0.5): the closest documented match.
        rand_augment = [v2.RandAugment(num_ops=2, magnitude=10)] if name == "imagenet" else []
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4, 0.0), *rand_augment, *normalize])
    if name == "mocov2":
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                           v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                           v2.RandomApply([BLUR], p=0.5), v2.RandomHorizontalFlip(), *normalize])
    if name == "ncl-sim":
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                           v2.ColorJitter(0.4, 0.4, 0.4, 0.0), v2.RandomGrayscale(0.2),
                           v2.RandomApply([BLUR], p=0.5), v2.RandomHorizontalFlip(), *normalize])
    if name == "none":
        return eval_transform(spec)
    raise UserError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")


class Views:
    """One view per transform of the same image: a contrastive branch's query view and key view(s)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


def training_transform(augment: str, key_augment: str, spec: ModelSpec, views: int):
    """The training images' transform: the `augment` view alone, or with views - 1 key views augmented by
    `key_augment` (empty: a second draw of `augment`)."""
    query = train_transform(augment, spec)
    if views == 1:
        return query
    key = train_transform(key_augment, spec) if key_augment else query
    return Views([query, *[key] * (views - 1)])


def eval_transform(spec: ModelSpec) -> v2.Compose:
    return preprocess.eval_transform(spec.resize, spec.input_size, spec.mean, spec.std)
