"""Model names: the defaults derived from a checkpoint, every name checked against what Triton serves."""
from __future__ import annotations

from expertfuse.contract import check_model_name


def default_name(method: str, experts: tuple[int, ...], total: int, fp16: bool = False, suffix: str = "",
                 names: list[str] | None = None) -> str:
    """ncl (every expert), ncl_expert1, ncl_soft (a named head), ncl_experts0_2, ..._fp16, ..._trt."""
    if len(experts) == total and experts == tuple(range(total)):
        part = ""
    elif len(experts) == 1:
        part = f"_{names[experts[0]]}" if names else f"_expert{experts[0]}"
    else:
        part = "_experts" + "_".join(map(str, experts))
    return check_model_name(f"{method}{part}{'_fp16' if fp16 else ''}{suffix}")


def naive_ensemble_names(name: str, experts: tuple[int, ...]) -> list[str]:
    """Every model the naive ensemble writes, all named after `name` (so two exports side by side never share a
    member): one per expert (<name>_expert<k>), the ensemble (<name>_naive) and its mean step (all checked)."""
    return [check_model_name(f"{name}{suffix}") for suffix in
            [f"_expert{k}" for k in experts] + ["_naive", "_naive_mean"]]
