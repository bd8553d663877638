"""The images every cost is timed on, in-process and served, by our load generator and by perf_analyzer.

An early-exit model's work depends on its input: random pixels all leave after the first expert (the softmax of
noise is confident), so a cost timed on them is the cost of one expert, not of the mix of exits the model makes
on real images. Costs are therefore timed on a fixed sample of the evaluation split, the images the accuracy is
scored on; only where no labelled images exist (random-weight real-size models, `bench.tune`,
`bench.served_compare`) are random images used, and those commands say so.
"""
from __future__ import annotations

import numpy as np

TIMED_IMAGES = 256  # evaluation images a cost is timed on (at least one batch): the exit mix of a few hundred
TIMED_IMAGES_SEED = 0


def timed_index(available: int, batch: int, images: int = TIMED_IMAGES) -> np.ndarray:
    """Which of `available` evaluation images are timed, in order: a fixed-seed sample of max(images, batch), a
    whole number of batches (drawn with replacement only when the split is smaller than that)."""
    count = max(images, batch) // batch * batch
    return np.random.default_rng(TIMED_IMAGES_SEED).choice(available, count, replace=count > available)


def timing_batches(pixels: np.ndarray, batch: int, images: int = TIMED_IMAGES) -> list[np.ndarray]:
    """The timed sample of `pixels` (uint8 NHWC evaluation images) as consecutive batches to cycle through."""
    index = timed_index(len(pixels), batch, images)
    return [pixels[index[i:i + batch]] for i in range(0, len(index), batch)]


def random_images(size: int, count: int = TIMED_IMAGES, seed: int = 0) -> np.ndarray:
    """Random uint8 NHWC images, for the commands that have no labelled images (and say they time on these)."""
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3), dtype=np.uint8)

