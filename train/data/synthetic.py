"""An embedded long-tailed image dataset: no download, deterministic by seed, learnable in a few CPU epochs.

Each class shows itself through two views, as objects in photographs do through several features (shape,
texture, colour): a striped patch (a hue, an orientation and a frequency) and a ringed badge (another hue and a
ring frequency). Within each view the classes are confusable combinations of shared attributes: no single
attribute names a class. Half of the images show both views, the others one view only. This multi-view structure
is what makes an ensemble of differently initialised networks beat its best member on real images (Allen-Zhu & Li,
"Towards Understanding Ensemble, Knowledge Distillation and Self-Distillation", 2020): each network learns some
views of a class and memorises the single-view images of the others, and the experts do not all miss the same
views. With one view per class the experts learned the same function, agreed on 93% of the images and the
ensemble bought nothing. Every image draws its own nuisance: places, sizes, phases and contrast, jitter of every
attribute, a distractor grating, a textured background and pixel noise.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]
BOTH_VIEWS = 0.5  # the share of images that show both views of their class


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


def badge_attributes(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The second view, per class: RGB colour [C, 3] and ring frequency [C] (cycles per image) of the badge.
    The same hue x level grid as the stripes, over a fixed shuffle of the classes: classes that share a stripe
    attribute mostly differ in their badge, as categories alike in one feature differ in another."""
    hues = max(1, math.ceil(math.sqrt(num_classes)))
    order = np.random.RandomState(1).permutation(num_classes)
    hue = 0.05 + 0.8 * (order % hues) / hues
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.9, 0.8) for h in hue])
    levels = max(2, math.ceil(num_classes / hues))
    return rgb, 4.0 * (11.0 / 4.0) ** (order // hues / (levels - 1))  # 4..11 rings per image: >= 3 pixels per ring at 32


def _rings(freq, phase, size: int, centre) -> np.ndarray:
    """Concentric rings [N, H, W] in [0, 1] around each centre."""
    yy, xx = _unit_grid(size)
    radius = np.hypot(xx[None] - centre[:, 0, None, None], yy[None] - centre[:, 1, None, None])
    return 0.5 + 0.5 * np.cos(2 * np.pi * freq[:, None, None] * radius + phase[:, None, None])


def _window(rng, size: int, centre, show) -> np.ndarray:
    """A soft round window [N, H, W, 1] of random size and contrast around each centre; zero where `show` is False."""
    yy, xx = _unit_grid(size)
    radius = rng.uniform(0.14, 0.22, len(centre))
    dist2 = (xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2
    weight = show * rng.uniform(0.7, 1.0, len(centre))
    return (np.exp(-dist2 / (2 * radius[:, None, None] ** 2)) * weight[:, None, None])[..., None]


def _layout(rng, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which views each image shows (both for BOTH_VIEWS of them, else one, either equally likely) and where:
    side by side when both, anywhere near the middle when one. Returns show_stripes, show_badge [N] and their
    centres [N, 2]."""
    u = rng.uniform(0, 1, n)
    one = (1 - BOTH_VIEWS) / 2
    show_stripes, show_badge = u < BOTH_VIEWS + one, (u < BOTH_VIEWS) | (u >= BOTH_VIEWS + one)
    left, right = rng.uniform(0.25, 0.4, n), rng.uniform(0.6, 0.75, n)
    swap = rng.randint(0, 2, n).astype(bool)
    stripes = np.stack([np.where(swap, right, left), rng.uniform(0.3, 0.7, n)], 1)
    badge = np.stack([np.where(swap, left, right), rng.uniform(0.3, 0.7, n)], 1)
    alone = ~(show_stripes & show_badge)
    stripes[alone] = badge[alone] = rng.uniform(0.35, 0.65, (alone.sum(), 2))
    return show_stripes, show_badge, stripes, badge


def _backgrounds(rng, n: int, size: int, colours: np.ndarray) -> np.ndarray:
    """Low-frequency colour texture [N, H, W, 3] (a coarse random grid, upsampled) under a faint grating of
    a random orientation in one of the class colours."""
    cells = 4
    coarse = rng.uniform(0.2, 0.8, (n, cells, cells, 3))
    idx = np.arange(size) * cells // size
    distractor = _gratings(rng.uniform(0, np.pi, n), rng.uniform(1.5, 5, n), rng.uniform(0, 2 * np.pi, n), size,
                           rng.uniform(0, 1, (n, 2)))
    tint = colours[rng.randint(0, len(colours), n)][:, None, None, :]
    return 0.7 * coarse[:, idx][:, :, idx] + 0.3 * distractor[..., None] * tint


def synthesize(counts: list[int], seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, 3] uint8 and labels [N] int64, `counts[c]` images of class c."""
    rng = np.random.RandomState(seed)
    rgb, angle, freq = class_attributes(len(counts))
    badge_rgb, ring_freq = badge_attributes(len(counts))
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    show_stripes, show_badge, stripes_at, badge_at = _layout(rng, n)
    stripes = _gratings(angle[labels] + rng.normal(0, 0.08, n), freq[labels] * rng.uniform(0.93, 1.07, n),
                        rng.uniform(0, 2 * np.pi, n), image_size, rng.uniform(0, 1, (n, 2)))
    rings = _rings(ring_freq[labels] * rng.uniform(0.95, 1.05, n), rng.uniform(0, 2 * np.pi, n), image_size, badge_at)
    stripes = stripes[..., None] * (rgb[labels] + rng.normal(0, 0.05, (n, 3)))[:, None, None, :]
    rings = rings[..., None] * (badge_rgb[labels] + rng.normal(0, 0.05, (n, 3)))[:, None, None, :]
    images = _backgrounds(rng, n, image_size, rgb)
    for view, mask in ((stripes, _window(rng, image_size, stripes_at, show_stripes)),
                       (rings, _window(rng, image_size, badge_at, show_badge))):
        images = (1 - mask) * images + mask * view
    images += rng.normal(0, 0.06, images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)
