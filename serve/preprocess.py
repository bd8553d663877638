"""The preprocessing of an image, defined once: shorter side resized to `resize`, center crop `size`,
RGB uint8 pixels. Training evaluation builds on it (train.data.transforms.eval_transform) and the
client applies it before sending; mean/std normalization happens inside the exported graph."""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def pixel_transform(resize: int, size: int) -> v2.Compose:
    """PIL image / HWC uint8 array -> uint8 tensor [3, size, size]."""
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size)])


def to_model_input(pixels: torch.Tensor, layout: str):
    """uint8 [N,3,H,W] -> the graph's input: uint8 NHWC, or FP32 NCHW pixels 0..255 (numpy)."""
    if layout in ("NHWC", "FORMAT_NHWC"):
        return pixels.permute(0, 2, 3, 1).contiguous().numpy()
    return pixels.float().numpy()
