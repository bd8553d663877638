"""An embedded long-tailed image dataset: no download, deterministic by seed, learnable in a few CPU epochs.

Each class is a coloured grating patch defined by a combination of attributes that it shares with other
classes: a hue (one of a few, close to each other), an orientation and a frequency. No single attribute
names a class, so classes that share two attributes are confused the way similar categories are in real
data, which gives NCL's hard-category mining and the experts' disagreement something to work on.
Every image draws its own nuisance: the patch's position, size, phase and contrast, jitter of every
attribute, a distractor grating of a random class's colour, a low-frequency textured background and
pixel noise.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def class_attributes(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: RGB colour [C, 3], orientation [C] (radians) and frequency [C] (cycles per image).
    Class c takes hue c % H and orientation c // H on a near-square grid, so each hue and each orientation
    is shared by several classes; the frequency alternates so neighbours on the grid differ in it too."""
    hues = max(1, math.ceil(math.sqrt(num_classes)))
    orientations = math.ceil(num_classes / hues)
    c = np.arange(num_classes)
    hue = 0.8 * (c % hues) / hues  # not the full circle: the last hue does not wrap round to the first
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.75, 0.9) for h in hue])
    angle = np.pi * (c // hues) / orientations
    freq = np.where((c % hues + c // hues) % 2 == 0, 2.5, 4.0)
    return rgb, angle, freq


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) [H, W] scaled to [0, 1)."""
    return np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")


def _gratings(angle, freq, phase, size: int, shift) -> np.ndarray:
    """Sinusoidal gratings [N, H, W] in [0, 1], one per row of the parameters."""
    yy, xx = _unit_grid(size)
    xs, ys = xx[None] - shift[:, 0, None, None], yy[None] - shift[:, 1, None, None]
    coord = xs * np.cos(angle)[:, None, None] + ys * np.sin(angle)[:, None, None]
    return 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * coord + phase[:, None, None])


def _patch_masks(rng, n: int, size: int) -> np.ndarray:
    """A soft round window [N, H, W] at a random place and of a random size: where the object is."""
    yy, xx = _unit_grid(size)
    centre = rng.uniform(0.3, 0.7, (n, 2))
    radius = rng.uniform(0.25, 0.45, n)
    dist2 = (xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2
    return np.exp(-dist2 / (2 * radius[:, None, None] ** 2))


def _backgrounds(rng, n: int, size: int) -> np.ndarray:
    """Low-frequency colour texture [N, H, W, 3]: a coarse random grid, upsampled."""
    cells = 4
    coarse = rng.uniform(0.2, 0.8, (n, cells, cells, 3))
    idx = np.arange(size) * cells // size
    return coarse[:, idx][:, :, idx]


def synthesize(counts: list[int], seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, 3] uint8 and labels [N] int64, `counts[c]` images of class c."""
    rng = np.random.RandomState(seed)
    rgb, angle, freq = class_attributes(len(counts))
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    pattern = _gratings(angle[labels] + rng.normal(0, 0.12, n), freq[labels] * rng.uniform(0.9, 1.1, n),
                        rng.uniform(0, 2 * np.pi, n), image_size, rng.uniform(0, 1, (n, 2)))
    colour = rgb[labels] + rng.normal(0, 0.08, (n, 3))
    other = rng.randint(0, len(counts), n)  # a distractor with another class's colour, random orientation
    distractor = _gratings(rng.uniform(0, np.pi, n), rng.uniform(1.5, 5, n), rng.uniform(0, 2 * np.pi, n),
                           image_size, rng.uniform(0, 1, (n, 2)))
    mask = (_patch_masks(rng, n, image_size) * rng.uniform(0.6, 1.0, (n, 1, 1)))[..., None]
    background = _backgrounds(rng, n, image_size)
    background = (0.7 * background + 0.3 * distractor[..., None] * rgb[other][:, None, None, :])
    images = (1 - mask) * background + mask * pattern[..., None] * colour[:, None, None, :]
    images += rng.normal(0, 0.08, images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)
