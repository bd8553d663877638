"""Parity: does an artifact compute what its PyTorch reference computes? One comparison, named tolerances.

Values compare like numpy.allclose (|got - ref| <= atol + rtol * |ref|), so large logits are judged by
their relative error. Top-1 must agree wherever the reference is not a near-tie: a sample whose two
best reference logits are closer than the value tolerance may legitimately flip. Reduced-precision
uses (FP16, INT8) are judged by top-1 agreement alone, over enough images to make that meaningful.
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

    def describe(self) -> str:
        if not self.check_values:
            return f"top-1 agreement >= {100 * self.min_top1:g}%"
        return f"allclose(rtol={self.rtol:g}, atol={self.atol:g}) and identical top-1"


# One tolerance per use. Export gates what it writes; bench and served checks refuse a wrong model before
# timing it (an FP16 sanity gate: a wrong model agrees about 1/C of the time).
EXPORT_FP32 = Tolerance("export-fp32", rtol=1e-4, atol=1e-4)
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


@dataclass
class ParityResult:
    max_abs_diff: float
    max_rel_excess: float  # max of |got - ref| / (atol + rtol |ref|): <= 1 passes allclose
    top1_agreement: float
    top1_disagreements: int  # outside near-ties
    samples: int
    ok: bool
    tolerance: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"max|diff| {self.max_abs_diff:.2e} ({self.max_rel_excess:.2f} of allclose), top-1 agreement "
                f"{100 * self.top1_agreement:.1f}% over {self.samples}")


def compare(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> ParityResult:
    """Compare logits [N, C] with their reference under `tol`."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ParityError(f"output shape {got.shape} differs from the reference's {ref.shape}")
    if not np.isfinite(got).all():
        return ParityResult(float("inf"), float("inf"), 0.0, len(got), len(got), False, tol.name)
    bound = tol.atol + tol.rtol * np.abs(ref)
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
    return ParityResult(float(diff.max()) if diff.size else 0.0, excess, top1, disagreements, len(got), ok, tol.name)


def require(result: ParityResult, what: str, tol: Tolerance | None = None) -> ParityResult:
    """Raise ParityError (exit 1) unless `result` passes; `tol`: the tolerance it was compared with, when not a named one."""
    if not result.ok:
        needs = (tol or TOLERANCES[result.tolerance]).describe()
        raise ParityError(f"{what} disagrees with PyTorch: {result.describe()}; needs {needs}")
    return result
