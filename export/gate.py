"""The export parity gate: an artifact is written only if it computes what the PyTorch reference computes.

FP32 is judged by float32's own error (expertfuse.parity.EXPORT_FP32): the reference is the network in float64,
and PyTorch's float32 run on the same images sets the scale the graph's error is held to. FP16 graphs are judged
by top-1 agreement (EXPORT_FP16)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from expertfuse.errors import ParityError
from expertfuse.parity import ParityResult, compare, float32_error, require
from expertfuse.preprocess import graph_input
from export.graph import expert_reference_logits
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


def expert_references(job: ExportJob, images: torch.Tensor, experts: tuple[int, ...],
                      chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Every chosen expert's logits [N, K, C] in float64 (the reference) and in float32 (PyTorch's own run, whose
    distance from the reference sets the gate's scale), the network run `chunk` images at a time."""
    def logits(model) -> np.ndarray:
        parts = [expert_reference_logits(model, experts, x, job.opts.input_layout) for x in images.split(chunk)]
        return torch.cat(parts).double().numpy()
    return logits(job.checkpoint.model_float64), logits(job.model)


def _run(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, chunk: int) -> np.ndarray:
    return np.concatenate([run(x.numpy()) for x in images.split(chunk)])


def check_parity(job: ExportJob, run: Callable[[np.ndarray], np.ndarray], batches: list[int],
                 references: dict | None = None) -> list[dict]:
    """Run the artifact at each batch size on random and real-looking inputs against the float64 reference.
    FP32: every batch must pass, held to PyTorch float32's error over all the images of that kind. FP16: judged over
    FP16_IMAGES images (small batches are shown, not judged). Raises ParityError (nothing is written) on failure;
    returns one row per check for the report. `references` keeps the float64 references and scales per input kind
    for another artifact of the same job (they do not depend on the artifact)."""
    judged: list[tuple[str, int, ParityResult]] = []
    rows, top, tol = [], max(batches), job.request.tolerance()
    references = {} if references is None else references
    count = max(top, FP16_IMAGES) if job.opts.fp16 else top
    for kind, images in test_images(job, count).items():
        if kind not in references:
            ref64, ref32 = (logits.mean(1) for logits in expert_references(job, images, job.opts.experts, top))
            references[kind] = ref64, float32_error(ref32, ref64)
        ref, scale = references[kind]
        checks = [(b, compare(run(images[:b].numpy()), ref[:b], tol, scale)) for b in sorted(set(batches))]
        if job.opts.fp16:
            checks.append((len(images), compare(_run(run, images, top), ref, tol, scale)))
        for batch, result in checks:
            rows.append({"inputs": kind, "batch": batch, "scale_images": len(images), **result.to_dict()})
            print(f"  parity {kind:>12} batch {batch:>4}: {result.describe()}")
        judged += [(kind, b, r) for b, r in (checks[-1:] if job.opts.fp16 else checks)]
    for kind, batch, result in judged:
        try:
            require(result, f"the exported model ({kind} inputs, batch {batch})", tol)
        except ParityError as exc:
            raise ParityError(f"{exc}; nothing written") from None
    kind, batch, worst = max(judged, key=lambda j: j[2].max_rel_excess)
    print(f"parity gate passed ({tol.describe()}); worst: {kind} inputs, batch {batch}: {worst.describe()}, "
          f"scale measured on {count} images")
    return rows


def first_passing(job: ExportJob, runners: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]],
                  batches: list[int]) -> tuple[str, list[dict], list[str]]:
    """Gate the candidate fusions in the order given (the faster first) and keep the first that passes, so that
    `--fusion auto` falls back to the other fusion, saying why, rather than write nothing while a correct graph
    exists. `runners` makes each candidate's runner when it is gated. Returns (fusion, its parity rows, the
    fallback notes); raises the last ParityError when none passes."""
    names, notes, references = list(runners), [], {}
    for i, fusion in enumerate(names):
        try:
            return fusion, check_parity(job, runners[fusion](), batches, references), notes
        except ParityError as exc:
            if i == len(names) - 1:
                raise ParityError(f"{exc} (fusion {', '.join(names[:i])} failed too)" if notes else str(exc)) from None
            notes.append(f"fusion {fusion} failed the export gate, falling back to {names[i + 1]}: {exc}")
            print(notes[-1])
    raise ParityError("no fusion to export")
