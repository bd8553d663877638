"""Image preprocessing, defined once: pixels -> the model's input, and pixels -> normalized tensor.

A served model receives RGB uint8 pixels (shorter side resized to `resize`, center crop `size`) and
normalizes them inside the graph with the checkpoint's mean/std. Training's evaluation, export's
PyTorch reference, the client and tests all go through these functions, so all see the same numbers.
torch and torchvision are imported where a function needs them: the client reads images at the model's size
without either (their start-up is seconds; its requests are not).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from expertfuse.errors import UserError

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


@functools.cache  # stateless: one per (resize, size) serves every image
def pixel_transform(resize: int, size: int) -> v2.Compose:
    """PIL image / HWC uint8 array -> uint8 tensor [3, size, size]."""
    from torchvision.transforms import v2  # here, not at the top: importing torchvision costs every CLI a second
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size)])


def served_pixels(image, resize: int, size: int) -> np.ndarray:
    """PIL image / HWC uint8 array -> uint8 [size, size, 3], the pixels a served model receives: exactly
    pixel_transform's. An 8-bit RGB image whose shorter side already is `resize` is only center-cropped, in numpy
    (torchvision's resize returns such an image as it is); the rest go through torchvision."""
    array = np.asarray(image)
    height, width = array.shape[:2]
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and min(height, width) == resize >= size:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))  # as v2.CenterCrop
        return np.ascontiguousarray(array[top:top + size, left:left + size], dtype=np.uint8)
    return pixel_transform(resize, size)(image).permute(1, 2, 0).numpy()


def normalize_ops(mean, std) -> list:
    """uint8 [.., 3, H, W] -> float (x/255 - mean)/std: the ops training appends to its pixel pipelines."""
    import torch
    from torchvision.transforms import v2
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(resize: int, size: int, mean, std) -> v2.Compose:
    """Test-time preprocessing of one image, as the exported graph sees it after its own normalization."""
    from torchvision.transforms import v2
    return v2.Compose([pixel_transform(resize, size), *normalize_ops(mean, std)])


def normalize_pixels(pixels: torch.Tensor, mean, std, layout: str = "uint8-nhwc",
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch of graph inputs (uint8 NHWC, or float NCHW holding 0..255) -> normalized float NCHW (float32, or
    float64 for the export gate's reference)."""
    import torch
    dtype = dtype or torch.float32
    x = pixels.permute(0, 3, 1, 2) if layout == "uint8-nhwc" else pixels
    x = x.to(dtype) / 255.0
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return (x - m) / s


def folded_normalization(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with normalize_pixels(x) == x * scale - shift: one multiply-add inside a graph."""
    import torch
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t


def graph_input(pixels: np.ndarray, layout: str) -> np.ndarray:
    """uint8 [N, H, W, 3] pixels in a graph's input layout: uint8 NHWC as they are, or FP32 NCHW 0..255.
    `layout` is the contract's name (uint8-nhwc, float-nchw) or Triton's input format (NHWC, FORMAT_NHWC, ...)."""
    if layout in ("NHWC", "FORMAT_NHWC", "uint8-nhwc"):
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit images (PNG 'I;16', 'I') are scaled to 8 bits, not clipped;
    a file that is not an image is a UserError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image ({str(exc).splitlines()[0][:120]})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")
