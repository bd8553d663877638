"""An embedded long-tailed image dataset: no download, deterministic by seed, learnable in a few CPU epochs.

Each class is a coloured sinusoidal grating with its own hue, orientation and frequency. Every image
draws its phase, orientation and colour jitter, contrast, background and pixel noise, so neighbouring
classes overlap a little and a small CNN needs a few epochs (not one batch) to separate them.
"""
from __future__ import annotations

import colorsys

import numpy as np

MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def class_prototypes(num_classes: int) -> list[dict]:
    return [{"rgb": np.array(colorsys.hsv_to_rgb(c / num_classes, 0.8, 0.9)),
             "angle": np.pi * c / num_classes,
             "freq": 1.5 + (c % 3)} for c in range(num_classes)]


def synthesize(counts: list[int], seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, 3] uint8 and labels [N] int64, `counts[c]` images of class c."""
    rng = np.random.RandomState(seed)
    protos = class_prototypes(len(counts))
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing="ij")
    angle = np.array([protos[c]["angle"] for c in labels]) + rng.normal(0, 0.2, n)
    freq = np.array([protos[c]["freq"] for c in labels]) * rng.uniform(0.85, 1.15, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    coord = (xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]) / image_size
    pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * coord + phase[:, None, None])
    rgb = np.stack([protos[c]["rgb"] for c in labels]) + rng.normal(0, 0.12, (n, 3))
    alpha = rng.uniform(0.4, 0.9, (n, 1, 1, 1))
    background = rng.uniform(0.2, 0.7, (n, 1, 1, 1))
    images = (1 - alpha) * background + alpha * pattern[..., None] * rgb[:, None, None, :]
    images += rng.normal(0, 0.1, images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)
