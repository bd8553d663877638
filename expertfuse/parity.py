"""Parity: does an artifact compute what its PyTorch reference computes? One comparison, named tolerances.

An FP32 export is judged by float32's own error: the reference is the PyTorch model run in float64, and the
float32 PyTorch model's distance from it on the same images sets the scale. The graph passes when its distance
is within `factor` times that scale plus a floor of a few float32 epsilons of the largest logit. Deep networks
(ResNet-32 and beyond) legitimately move logits by a few 1e-4 with the order of float32 arithmetic (ONNX Runtime
and OpenVINO differ from each other by that much), so a fixed absolute bound would judge arithmetic order, not
correctness; a wrong graph is off by orders of magnitude more. Other uses compare like numpy.allclose
(|got - ref| <= atol + rtol * |ref|). Top-1 must agree wherever the reference is not a near-tie: a sample whose
two best reference logits are closer than the value bound may legitimately flip. Reduced-precision uses (FP16,
INT8) are judged by top-1 agreement alone, over enough images to make that meaningful.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from expertfuse.contract import PRECISIONS
from expertfuse.errors import ParityError, UserError


@dataclass(frozen=True)
class Tolerance:
    name: str
    rtol: float = 1e-4
    atol: float = 1e-4
    min_top1: float = 1.0  # least fraction of top-1 agreement (near-ties excused when values are checked)
    check_values: bool = True  # False: reduced precision, judged by top-1 agreement only
    # Set: judged against a float64 reference, |got - ref64| <= factor x (PyTorch float32's own error) + floor
    # (rtol and atol unused).
    factor: float | None = None
    floor_eps: float = 1.0  # the floor, in float32 epsilons of the largest reference logit (tiny logits)

    @property
    def against_float64(self) -> bool:
        return self.factor is not None

    def describe(self) -> str:
        if not self.check_values:
            return f"top-1 agreement >= {100 * self.min_top1:g}%"
        if self.against_float64:
            return (f"error vs the float64 reference <= {self.factor:g} x PyTorch float32's own error + "
                    f"{self.floor_eps:g} float32 eps x the largest logit, and identical top-1")
        return f"allclose(rtol={self.rtol:g}, atol={self.atol:g}) and identical top-1"


# One tolerance per use. Export gates what it writes; bench and served checks refuse a wrong model before
# timing it (an FP16 sanity gate: a wrong model agrees about 1/C of the time).
EXPORT_FP32 = Tolerance("export-fp32", factor=8.0)
EXPORT_FP16 = Tolerance("export-fp16", min_top1=0.995, check_values=False)
BENCH_FP32 = Tolerance("bench-fp32", rtol=1e-3, atol=1e-3)
BENCH_FP16 = Tolerance("bench-fp16", min_top1=0.9, check_values=False)
BENCH_INT8 = Tolerance("bench-int8", min_top1=0.8, check_values=False)
TOLERANCES = {t.name: t for t in (EXPORT_FP32, EXPORT_FP16, BENCH_FP32, BENCH_FP16, BENCH_INT8)}


BENCH_BY_PRECISION = dict(zip(PRECISIONS, (BENCH_FP32, BENCH_FP16, BENCH_INT8)))


def bench_tolerance(precision: str) -> Tolerance:
    """How closely bench requires a model of `precision` to follow its reference before it scores or times it."""
    if precision not in BENCH_BY_PRECISION:
        raise UserError(f"model precision {precision!r} is none of {', '.join(PRECISIONS)}; re-export the model")
    return BENCH_BY_PRECISION[precision]


FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass
class ParityResult:
    max_abs_diff: float  # against the reference (float64 for the float64-judged gate)
    max_rel_excess: float  # max of |got - ref| / bound: <= 1 passes
    top1_agreement: float
    top1_disagreements: int  # outside near-ties
    samples: int
    ok: bool
    tolerance: str
    reference_error: float | None = None  # float64-judged: PyTorch float32's own max |error|, the scale
    bound: float | None = None  # float64-judged: factor x reference_error + floor
    ratio: float | None = None  # float64-judged: max_abs_diff / reference_error

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        top1 = f"top-1 agreement {100 * self.top1_agreement:.1f}% over {self.samples}"
        if self.reference_error is None:
            return f"max|diff| {self.max_abs_diff:.2e} ({self.max_rel_excess:.2f} of allclose), {top1}"
        return (f"max|diff| vs float64 {self.max_abs_diff:.2e} = {self.ratio:.2f}x PyTorch float32's own "
                f"{self.reference_error:.2e} (bound {self.bound:.2e}: {self.max_rel_excess:.2f} of it), {top1}")


def float32_error(float32_logits: np.ndarray, float64_logits: np.ndarray) -> float:
    """The scale of the float64-judged gate: how far PyTorch's own float32 run lies from float64."""
    return float(np.abs(np.asarray(float32_logits, np.float64) - np.asarray(float64_logits, np.float64)).max())


def _bound(tol: Tolerance, ref: np.ndarray, reference_error: float | None) -> np.ndarray | float:
    if not tol.against_float64:
        return tol.atol + tol.rtol * np.abs(ref)
    if reference_error is None:
        raise ValueError(f"tolerance {tol.name} judges against float64: pass PyTorch float32's own error")
    return tol.factor * reference_error + tol.floor_eps * FLOAT32_EPS * float(np.abs(ref).max(initial=0.0))


def compare(got: np.ndarray, ref: np.ndarray, tol: Tolerance, reference_error: float | None = None) -> ParityResult:
    """Compare logits [N, C] with their reference under `tol` (a float64 reference and `reference_error`, PyTorch
    float32's own error on the image set, for a float64-judged tolerance)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ParityError(f"output shape {got.shape} differs from the reference's {ref.shape}")
    scale = {"reference_error": reference_error} if tol.against_float64 else {}
    if not np.isfinite(got).all():
        return ParityResult(float("inf"), float("inf"), 0.0, len(got), len(got), False, tol.name, **scale)
    bound = np.broadcast_to(_bound(tol, ref, reference_error), ref.shape)
    diff = np.abs(got - ref)
    agree = got.argmax(1) == ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref, ref - np.inf], 1)
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * bound.max(axis=1)
    disagreements = int((~agree & ~near_tie).sum()) if tol.check_values else int((~agree).sum())
    top1 = float(agree.mean()) if len(agree) else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero tolerance: any difference is infinitely over
        excess = float(np.where(diff == 0, 0.0, diff / bound).max()) if diff.size else 0.0
    if tol.check_values:
        ok = excess <= 1.0 and disagreements == 0
    else:
        ok = top1 >= tol.min_top1
    max_diff = float(diff.max()) if diff.size else 0.0
    if tol.against_float64:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.float64(max_diff) / reference_error) if max_diff else 0.0
        scale.update(bound=float(bound.max()) if bound.size else 0.0, ratio=ratio)
    return ParityResult(max_diff, excess, top1, disagreements, len(got), ok, tol.name, **scale)


def require(result: ParityResult, what: str, tol: Tolerance | None = None) -> ParityResult:
    """Raise ParityError (exit 1) unless `result` passes; `tol`: the tolerance it was compared with, when not a named one."""
    if not result.ok:
        needs = (tol or TOLERANCES[result.tolerance]).describe()
        raise ParityError(f"{what} disagrees with PyTorch: {result.describe()}; needs {needs}")
    return result
