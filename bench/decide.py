"""What the report decides from: the best single expert, every headline ratio (from one interleaved run each,
with its 95% interval), the cost-accuracy points with their Pareto front, and the decision sentence."""
from __future__ import annotations

from collections.abc import Callable

from expertfuse.timing import RELIABLE_HALF_WIDTH, Interleaved, describe_ratio, ratio
from export.labelled import GROUPS

ACCURACY_AXES = ("overall", "few")


def scored(rows: list[dict], runtime: str) -> dict[str, dict]:
    """Variant name -> row, for the variants on `runtime` that passed their gates and were timed."""
    return {r["variant"]: r for r in rows if r["runtime"] == runtime and "accuracy" in r and "timing" in r}


def headline_runtime(rows: list[dict]) -> str | None:
    """ONNX Runtime (what Triton serves) when it ran, else the first runtime with results."""
    runtimes = [r["runtime"] for r in rows if "timing" in r]
    preferred = [rt for rt in ("onnxruntime-cuda", "onnxruntime-cpu") if rt in runtimes]
    return (preferred or runtimes or [None])[0]


def best_single(variants: dict[str, dict], ranking: list[int]) -> str | None:
    """The FP32 single expert ranked first on the calibration split (`ranking`: experts best first there) among
    those measured: 'single' in every headline. Never picked on the evaluation split, which would score the pick
    above its true accuracy."""
    singles = {r["experts"][0]: name for name, r in variants.items() if len(r["experts"]) == 1 and r["precision"] == "fp32"
               and r["fusion"] != "early-exit"}
    return next((singles[k] for k in ranking if k in singles), None)


def fused_ensemble(variants: dict[str, dict], timing: Interleaved, runtime: str) -> str | None:
    """The faster fusion of the full FP32 ensemble at this batch (what `export --fusion auto` would ship)."""
    names = [n for n in ("ensemble-grouped", "ensemble-loop") if n in variants]
    return min(names, key=lambda n: timing.median_s(f"{n}@{runtime}"), default=None)


def accuracy_columns(accuracy: dict) -> dict:
    """A variant's accuracy as a cost-accuracy point carries it: overall, many/medium/few, agreement, and the 95%
    intervals of overall and few-shot."""
    return {**{k: accuracy[k] for k in (*GROUPS, "agreement")},
            **{f"{k}_ci95": accuracy.get("ci95", {}).get(k) for k in ACCURACY_AXES}}


def ratio_row(name: str, timing: Interleaved, numerator: str, denominator: str, **context) -> dict:
    return {"ratio_name": name, "numerator": numerator, "denominator": denominator, **context,
            **ratio(timing, numerator, denominator).to_dict()}


def inprocess_ratios(variants: dict[str, dict], timings: dict[int, Interleaved], runtime: str, single: str) -> list[dict]:
    """ensemble / single, grouped / loop, fp16 / fp32, int8 / fp32 and early exit / ensemble latency at every batch."""
    out = []
    for batch, timing in timings.items():
        key = lambda n: f"{n}@{runtime}"  # noqa: E731
        ensemble = fused_ensemble(variants, timing, runtime)
        pairs = [("ensemble / single", ensemble, single), ("grouped / loop", "ensemble-grouped", "ensemble-loop"),
                 ("fp16 / fp32", "ensemble-fp16", "ensemble-loop")]
        for name, row in variants.items():
            if row["precision"] == "int8":
                twin = next((n for n, r in variants.items() if r["precision"] == "fp32" and r["experts"] == row["experts"]
                             and r["fusion"] == row["fusion"]), "ensemble-loop")
                pairs.append((f"int8 / fp32 ({name} / {twin})", name, twin))
            if row["fusion"] == "early-exit":
                pairs.append((f"early exit / ensemble ({name})", name, ensemble))
        out += [ratio_row(title, timing, key(a), key(b), batch=batch, runtime=runtime)
                for title, a, b in pairs if a in variants and b in variants]
    return out


def pareto(points: list[dict], cost: str, acc: str) -> set[str]:
    """Names of the points no other point beats (cost no higher and accuracy no lower, one of them strictly)."""
    front = set()
    for p in points:
        beaten = any(q is not p and q[cost] <= p[cost] and q[acc] >= p[acc] and (q[cost] < p[cost] or q[acc] > p[acc])
                     for q in points)
        if not beaten:
            front.add(p["name"])
    return front


def cost_accuracy(variants: dict[str, dict], timings: dict[int, Interleaved], runtime: str, single: str) -> list[dict]:
    """One point per variant: accuracy (overall, many/medium/few) and cost relative to the best single expert at
    batch 1 (latency) and at the largest batch (latency per batch = 1 / throughput), each with its interval."""
    small, large = min(timings), max(timings)
    points = []
    for name, row in variants.items():
        costs = {f"cost_b{b}": ratio(timings[b], f"{name}@{runtime}", f"{single}@{runtime}").to_dict() for b in (small, large)}
        points.append({"name": name, "where": runtime, "experts": len(row["experts"]),
                       "experts_run": row["accuracy"].get("experts_run", float(len(row["experts"]))),
                       "precision": row["precision"],
                       **accuracy_columns(row["accuracy"]),
                       **costs, "cost_small": costs[f"cost_b{small}"]["ratio"],
                       "cost_large": costs[f"cost_b{large}"]["ratio"],
                       "cost_small_reliable": costs[f"cost_b{small}"]["reliable"],
                       "cost_large_reliable": costs[f"cost_b{large}"]["reliable"]})
    return points


def on_axes(p: dict, cost: str, acc: str) -> bool:
    """Whether a point stands on this (cost, accuracy) pair of axes: both measured, and its cost interval within
    +-10% (an UNRELIABLE cost is drawn hollow and never on the front)."""
    return p.get(cost) is not None and p.get(acc) == p.get(acc) and p.get(f"{cost}_reliable", False)


def mark_pareto(points: list[dict]) -> None:
    """Flag every point on the Pareto front of each (cost, accuracy) pair of axes, among the points measured in the
    same place (in-process, or served over one protocol: each has its own best expert as the unit of cost)."""
    for cost in ("cost_small", "cost_large"):
        for acc in ACCURACY_AXES:
            front = set()
            for where in {p["where"] for p in points}:
                front |= pareto([p for p in points if p["where"] == where and on_axes(p, cost, acc)], cost, acc)
            for p in points:
                p[f"pareto_{cost}_{acc}"] = p["name"] in front


def decision(points: list[dict], ratios: list[dict], single: str, gain_of: Callable[[str, str], dict] | None = None,
             budget_s: float | None = None) -> dict | None:
    """The sentence the summary leads with: what the fused ensemble buys over the best expert, and for what cost.
    `gain_of(ensemble, single)` gives the accuracy gains with their intervals (bench.measure.evaluation.gain_interval).
    A cost whose interval is wider than +-10% is not stated as a figure: the sentence names it as too noisy and
    says what to rerun (`budget_s`: the --budget-s it had)."""
    by_name = {p["name"]: p for p in points}
    cost = {r["batch"]: r for r in ratios if r["ratio_name"] == "ensemble / single"}
    if single not in by_name or not cost:
        return None
    small, large = min(cost), max(cost)
    ensemble = cost[small]["numerator"].split("@")[0]
    gain = {acc: by_name[ensemble][acc] - by_name[single][acc] for acc in ("overall", "few")}
    intervals = gain_of(ensemble, single) if gain_of else {}

    def points(acc: str) -> str:
        ci = intervals.get(acc, {}).get("ci95")
        return f"{gain[acc]:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
    few = "" if gain["few"] != gain["few"] else f", {points('few')} on few-shot classes"

    def fusion(r: dict) -> str:
        """The fusion a ratio measured, named when it differs from the one at the smallest batch."""
        name = r["numerator"].split("@")[0]
        return "" if name == ensemble else f" ({name})"

    def times(r: dict) -> str:
        return describe_ratio(r) + fusion(r)
    shown = list(dict.fromkeys((small, large)))
    stated = [b for b in shown if cost[b]["reliable"]]
    noisy = [b for b in shown if not cost[b]["reliable"]]
    costs = " and ".join(f"{times(cost[b])} {'the cost ' if i == 0 else ''}at batch {b}" for i, b in enumerate(stated))
    sentence = (f"The ensemble ({ensemble}) buys {points('overall')} points overall{few}"
                + (f", for {costs}, against" if stated else " over") + f" the best single expert ({single}).")
    if noisy:
        sentence += " " + too_noisy({b: f"{cost[b]['ratio']:.2f}x [{cost[b]['ci95'][0]:.2f}, {cost[b]['ci95'][1]:.2f}]"
                                        + fusion(cost[b]) for b in noisy}, budget_s)
    return {"ensemble": ensemble, "single": single, "gain_points": gain,
            "gain_ci95": {acc: v["ci95"] for acc, v in intervals.items()}, "cost": {b: cost[b] for b in shown},
            "reliable": not noisy, "noisy_batches": noisy, "sentence": sentence}


def too_noisy(costs: dict[int, str], budget_s: float | None) -> str:
    """What the decision says of costs too noisy to state (batch -> the ratio and its interval): which, and what
    to rerun."""
    figures = " and ".join(f"at batch {b} ({text})" for b, text in costs.items())
    longer = f"longer than {budget_s:g} s" if budget_s else "longer"
    return (f"Its cost {figures} was too noisy to state (95% interval wider than +-{100 * RELIABLE_HALF_WIDTH:.0f}%): "
            f"rerun python -m bench with a --budget-s {longer} (4x the time halves the interval), on a quieter "
            f"machine.")
