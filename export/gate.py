"""The export parity gate: an artifact is written only if it computes what the PyTorch reference computes,
judged by expertfuse.parity's named tolerance (EXPORT_FP32, or EXPORT_FP16 for FP16 graphs)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from expertfuse.errors import ParityError
from expertfuse.parity import ParityResult, compare, require
from expertfuse.preprocess import graph_input
from export.graph import reference_logits
from export.job import ExportJob
from train.data.synthetic import synthesize

FP16_IMAGES = 400  # top-1 agreement of reduced precision is judged over this many images per input kind


def test_images(job: ExportJob, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and real-looking images (the synthetic set's striped patches and ringed badges) in the graph's
    input layout."""
    size = job.spec.input_size
    rng = np.random.RandomState(seed)
    images = {"random": rng.randint(0, 256, (count, size, size, 3), dtype=np.uint8),
              "real-looking": synthesize([count], seed=seed, image_size=size)[0]}
    return {kind: torch.from_numpy(graph_input(pixels, job.opts.input_layout)) for kind, pixels in images.items()}


def _compare(job: ExportJob, run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, chunk: int) -> ParityResult:
    """The artifact against the reference on `images`, run `chunk` images at a time."""
    parts = [images[i:i + chunk] for i in range(0, len(images), chunk)]
    ref = torch.cat([reference_logits(job.model, job.opts.experts, x, job.opts.input_layout) for x in parts]).numpy()
    got = np.concatenate([run(x.numpy()) for x in parts])
    return compare(got, ref, job.request.tolerance())


def check_parity(job: ExportJob, run: Callable[[np.ndarray], np.ndarray], batches: list[int]) -> list[dict]:
    """Run the artifact at each batch size on random and real-looking inputs against the reference.
    FP32: every batch must pass. FP16: judged over FP16_IMAGES images (small batches are shown, not judged).
    Raises ParityError (nothing is written) on failure; returns one row per check for the report."""
    judged: list[tuple[str, int, ParityResult]] = []
    rows, top = [], max(batches)
    count = max(top, FP16_IMAGES) if job.opts.fp16 else top
    for kind, images in test_images(job, count).items():
        checks = [(b, _compare(job, run, images[:b], b)) for b in sorted(set(batches))]
        if job.opts.fp16:
            checks.append((len(images), _compare(job, run, images, top)))
        for batch, result in checks:
            rows.append({"inputs": kind, "batch": batch, **result.to_dict()})
            print(f"  parity {kind:>12} batch {batch:>4}: {result.describe()}")
        judged += [(kind, b, r) for b, r in (checks[-1:] if job.opts.fp16 else checks)]
    for kind, batch, result in judged:
        try:
            require(result, f"the exported model ({kind} inputs, batch {batch})", job.request.tolerance())
        except ParityError as exc:
            raise ParityError(f"{exc}; nothing written") from None
    return rows
