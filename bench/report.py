"""The report a user decides from: summary.md led by the decision sentence and the machine, the cost-accuracy table
and plot (intervals as bars, Pareto front marked, UNRELIABLE costs hollow and never on it), what was not measured
and why, every ratio with its interval (unreliable ones flagged, never bold), absolute latencies, served accuracy
and latency-throughput curves; bench.json and CSV files carry everything, naming no machine path."""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from bench.decide import decision, mark_pareto  # noqa: E402
from bench.measure.machine import describe_machine  # noqa: E402
from bench.measure.served import MIN_WINDOW_REQUESTS, best_under  # noqa: E402
from expertfuse.cli import run_cli  # noqa: E402
from expertfuse.errors import UserError  # noqa: E402
from expertfuse.files import atomic_path, write_text  # noqa: E402
from expertfuse.timing import RELIABLE_HALF_WIDTH, describe_ratio  # noqa: E402
from export.labelled import GROUPS  # noqa: E402


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def bold_if_reliable(r: dict) -> str:
    """A ratio in bold when its interval is narrow enough to be a headline; else plain, flagged UNRELIABLE."""
    return f"**{describe_ratio(r)}**" if r["reliable"] else describe_ratio(r)


def cost_columns(point: dict) -> list[str]:
    return sorted((k for k in point if k.startswith("cost_b")), key=lambda k: int(k[6:]))


def inprocess_rows(result: dict) -> list[dict]:
    """One flat row per (variant, runtime, batch) for the CSV, plus the rows that were refused or skipped."""
    rows = []
    for r in result["inprocess"]:
        base = {k: v for k, v in r.items() if k not in ("timing", "accuracy", "parity_random", "parity_labelled")}
        base.update({f"top1_{g}": r["accuracy"][g] for g in GROUPS} if "accuracy" in r else {})
        rows += [{**base, "batch": b, **t} for b, t in r.get("timing", {}).items()] or [base]
    return rows


def point_rows(points: list[dict]) -> list[dict]:
    rows = []
    for p in points:
        row = {k: v for k, v in p.items() if not isinstance(v, (dict, list))}
        for acc in ("overall", "few"):
            ci = p.get(f"{acc}_ci95") or [None, None]
            row.update({f"{acc}_low": ci[0], f"{acc}_high": ci[1]})
        for col in cost_columns(p):
            row.update({col: p[col]["ratio"], f"{col}_low": p[col]["ci95"][0], f"{col}_high": p[col]["ci95"][1],
                        f"{col}_reliable": p[col]["reliable"]})
        rows.append(row)
    return rows


def ratio_rows(ratios: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in r.items() if k != "ci95"}, "low": r["ci95"][0], "high": r["ci95"][1]} for r in ratios]


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    """`columns` (default: every scalar key of the rows, in order of appearance) as a CSV, written atomically."""
    keys = columns or list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: Path, layout: bool = True) -> None:
    """A figure as PNG, laid out (unless it was) and written atomically, then closed."""
    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


SERVED_PREFIX = "triton"
STYLES = {"triton-http": ("s", "tab:orange"), "triton-grpc": ("^", "tab:green")}  # in-process: ("o", "tab:blue")
LABEL_RINGS_PT = (7, 11, 16, 22, 30, 40, 52, 66, 84, 110, 140, 180, 230)  # how far a point's number may move to stay clear


def style(where: str) -> tuple[str, str]:
    return STYLES.get(where, ("o", "tab:blue"))


def cost_panels(points: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(title, cost column, cost axis, points) of each panel: in-process at its smallest and largest batch, and
    served (every protocol, each against its own best expert) at the served batch."""
    panels = []
    for served in (False, True):
        group = [p for p in points if p["where"].startswith(SERVED_PREFIX) == served]
        cols = list(dict.fromkeys(c for p in group for c in cost_columns(p)))
        if not cols:
            continue
        if served:
            panels.append((f"served, batch {cols[0][6:]}, concurrency 1", cols[0], "cost_small", group))
            continue
        panels.append((f"in-process, batch {cols[0][6:]} (latency)", cols[0], "cost_small", group))
        if len(cols) > 1:
            panels.append((f"in-process, batch {cols[-1][6:]} (1 / throughput)", cols[-1], "cost_large", group))
    return panels


def draw_series(ax, group: list[dict], number: dict[str, int], col: str, cost: str, acc: str) -> list[tuple]:
    """One place's points on one panel: 95% intervals as error bars (cost on x, accuracy on y), filled markers
    where the cost is reliable, hollow where it is UNRELIABLE, the Pareto front as a line. Returns (number, x, y)."""
    marker, colour = style(group[0]["where"])
    shown = [p for p in group if col in p and p.get(acc) == p.get(acc)]
    if not shown:
        return []
    xs = [p[col]["ratio"] for p in shown]
    ys = [p[acc] for p in shown]
    xerr = [[x - p[col]["ci95"][0] for x, p in zip(xs, shown)], [p[col]["ci95"][1] - x for x, p in zip(xs, shown)]]
    ci = [p.get(f"{acc}_ci95") or [y, y] for p, y in zip(shown, ys)]
    yerr = [[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.6)
    for reliable in (True, False):
        pick = [i for i, p in enumerate(shown) if p[col]["reliable"] == reliable]
        if pick:
            ax.scatter([xs[i] for i in pick], [ys[i] for i in pick], marker=marker, s=36, zorder=3, linewidths=1.2,
                       edgecolors=colour, facecolors=colour if reliable else "none",
                       gid=f"{'reliable' if reliable else 'unreliable'} {group[0]['where']}",
                       label=f"{group[0]['where']}" + ("" if reliable else ", cost UNRELIABLE (hollow)"))
    front = sorted((x, y) for x, y, p in zip(xs, ys, shown) if p.get(f"pareto_{cost}_{acc}"))
    if front:
        ax.plot(*zip(*front), color=colour, linestyle="--", linewidth=1, gid=f"pareto {group[0]['where']}",
                label=f"Pareto front, {group[0]['where']}")
    return [(number[p["name"]], x, y) for p, x, y in zip(shown, xs, ys)]


def label_offsets() -> list[tuple[float, float]]:
    """Where a point's number may go, nearest first: rings of 8 directions (16 further out), in points."""
    return [(r * np.cos(a), r * np.sin(a)) for r in LABEL_RINGS_PT
            for a in np.radians(np.arange(45, 405, 45 if r < 40 else 22.5))]


def place_numbers(ax, marks: list[tuple], renderer) -> None:
    """Each point's number next to it, moved outwards ring by ring until it overlaps no other number, no marker and
    not the legend, inside the panel; a number moved far from its point gets a thin leader line. (With no room
    left at all the number is left off rather than drawn over another; the table still lists the point.)"""
    inside = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 4), 8, 8) for _, x, y in marks]
    if ax.get_legend():
        taken.append(ax.get_legend().get_window_extent(renderer))
    for n, x, y in marks:
        for dx, dy in label_offsets():
            label = ax.annotate(str(n), (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha="center",
                                va="center", gid="number")
            box = label.get_window_extent(renderer).expanded(1.15, 1.15)
            if inside.containsx(box.x0) and inside.containsx(box.x1) and inside.containsy(box.y0) and \
                    inside.containsy(box.y1) and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                if np.hypot(dx, dy) > LABEL_RINGS_PT[1]:  # the same text, with its leader line
                    label.remove()
                    ax.annotate(str(n), (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha="center",
                                va="center", gid="number", arrowprops=dict(arrowstyle="-", linewidth=0.4,
                                                                           color="gray", shrinkA=0, shrinkB=3))
                break
            label.remove()


def cost_accuracy_figure(points: list[dict]):
    """The cost-accuracy figure: one panel per cost (in-process at the smallest and largest batch, served) and
    accuracy (top-1 overall, few-shot), every point numbered as in the summary's table, that table's key beside."""
    panels = cost_panels(points)
    accs = [a for a in ("overall", "few") if any(p.get(a) == p.get(a) for p in points)]
    number = {p["name"]: i for i, p in enumerate(points, 1)}
    fig = plt.figure(figsize=(4.2 * len(panels) + 3.2, 3.8 * len(accs) + 0.6), dpi=120)
    grid = fig.add_gridspec(len(accs), len(panels) + 1, width_ratios=[1] * len(panels) + [0.75])
    marks = {}
    for row, acc in enumerate(accs):
        for col, (title, column, cost, group) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            marks[ax] = [m for where in dict.fromkeys(p["where"] for p in group)
                         for m in draw_series(ax, [p for p in group if p["where"] == where], number, column, cost, acc)]
            ax.axvline(1, color="gray", linewidth=0.6)
            ax.margins(0.18)
            ax.set(title=title, xlabel="cost relative to the best expert (x)", ylabel=f"top-1 {acc} (%)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
    key = fig.add_subplot(grid[:, -1])
    key.axis("off")
    key.text(0, 1, "\n".join(f"{number[p['name']]:>2}  {p['name']}" + ("" if p["where"].startswith(SERVED_PREFIX)
                                                                       else f" ({p['where']})") for p in points),
             va="top", ha="left", fontsize=7, family="monospace", transform=key.transAxes, gid="key")
    fig.suptitle("What each variant buys (accuracy) for what it costs\n95% intervals as bars; hollow: a cost "
                 f"interval wider than +-{100 * RELIABLE_HALF_WIDTH:.0f}%", fontsize=9)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for ax, m in marks.items():
        ax.set(xlim=ax.get_xlim(), ylim=ax.get_ylim())  # frozen: the numbers are placed in display space
        place_numbers(ax, m, renderer)
    return fig


def plot_early_exit_curve(record: dict, path: Path) -> None:
    """Experts run per image (x) against top-1 overall and on the tail group (y) for every global threshold, on the
    calibration split (where auto chose) and on the evaluation split (where it is scored), with the full ensemble's
    accuracy, the tolerance line, the thresholds that qualified (their lower bound within the tolerance: a point
    above the line can still fail) and the chosen setting marked."""
    auto = record["auto"]
    tail = auto.get("tail_group")
    fig, axes = plt.subplots(1, 2 if tail else 1, figsize=(11 if tail else 6, 4.5), squeeze=False)
    curve = sorted(auto["global_curve"], key=lambda r: r["calibration_mean_experts"])
    for ax, group in zip(axes[0], ["overall"] + ([tail] if tail else [])):
        for split, colour, full in (("calibration", "tab:blue", auto["full_ensemble"]),
                                    ("evaluation", "tab:orange", auto["full_ensemble_evaluation"])):
            ax.plot([r[f"{split}_mean_experts"] for r in curve], [r[split][group] for r in curve], color=colour,
                    marker=".", markersize=3, linewidth=1, label=f"one global threshold, {split} split")
            ax.axhline(full[group], color=colour, linestyle=":", linewidth=1, label=f"full ensemble, {split}")
            chosen = auto["chosen"]
            ax.plot(chosen[f"{split}_mean_experts"], chosen[split][group], marker="*", markersize=13, color=colour,
                    markeredgecolor="black", linestyle="none", label=f"chosen {chosen['threshold']}, {split}")
        band = auto["full_ensemble"][group] - auto["tolerance_points"]
        ax.axhline(band, color="tab:blue", linestyle="--", linewidth=0.8,
                   label=f"full ensemble - {auto['tolerance_points']:g}, calibration")
        passed = [r for r in curve if r["ok"]]
        ax.plot([r["calibration_mean_experts"] for r in passed], [r["calibration"][group] for r in passed],
                marker="o", markersize=5, markerfacecolor="none", color="tab:green", linestyle="none",
                label=f"qualifies ({100 * auto.get('confidence', 0.5):g}% lower bound within it)")
        ax.set(xlabel="experts run per image", ylabel=f"top-1 {group} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Early exit: chosen on {record['splits']['chosen_on']}\nscored on {record['splits']['scored_on']}",
                 fontsize=8)
    save_figure(fig, path)


def served_curves_figure(sweep: list[dict], p99_budget_ms: float | None = None):
    """Throughput (x) against p99 latency (y) over the concurrency sweep, one curve per model and protocol (the
    measured points only; client-bound ones ringed), and the p99 budget as a line when one was given."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    measured = [r for r in sweep if r.get("measured", True) and "p99_ms" in r]
    models = sorted({r["model"] for r in measured})
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    for key in sorted({(r["model"], r["protocol"]) for r in measured}):
        pts = sorted((r["concurrency"], r["throughput"], r["p99_ms"]) for r in measured
                     if (r["model"], r["protocol"]) == key)
        _, xs, ys = zip(*pts)
        grpc = key[1] == "grpc"  # a model's colour, the protocol's line and marker
        ax.plot(xs, ys, marker="^" if grpc else "o", linestyle="--" if grpc else "-", color=colours(models.index(key[0])),
                label=f"{key[0]} / {key[1]}")
        for c, x, y in pts:
            ax.annotate(f"c{c}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    bound = [r for r in measured if r.get("client_bound")]
    if bound:  # the load generator set these figures, not the server: marked, as in the served table
        ax.scatter([r["throughput"] for r in bound], [r["p99_ms"] for r in bound], s=90, facecolors="none",
                   edgecolors="black", linewidths=0.8, zorder=3, label="client-bound (the load generator's figure)")
    if p99_budget_ms:
        ax.axhline(p99_budget_ms, color="red", linestyle="--", linewidth=1, label=f"p99 budget {p99_budget_ms:g} ms")
    ax.set(xlabel="throughput (images/s)", ylabel="p99 latency (ms)", title="Served: latency vs throughput "
           "(each curve: concurrency rising)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def with_interval(p: dict, acc: str) -> str:
    ci = p.get(f"{acc}_ci95")
    return _fmt(p[acc]) + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def cost_accuracy_table(result: dict) -> list[str]:
    points = result["points"]
    if not points:
        return []
    cols = list(dict.fromkeys(c for p in points for c in cost_columns(p)))
    lines = ["## Cost and accuracy", "", f"Cost is latency relative to the best single expert ({result['single']}) in "
             "the same interleaved run (at the largest batch: 1 / throughput; served: the best expert served the same "
             "way); # numbers the points of cost_accuracy.png; * marks the Pareto front (cost at the smallest batch "
             "against overall top-1, among the points measured in the same place, never an UNRELIABLE cost); "
             "[ ] are 95% intervals.", "",
             "| # | variant | where | experts (run per image) | precision | top-1 | many | medium | few | agrees with "
             "PyTorch ensemble | " + " | ".join(f"cost at batch {c[6:]}" for c in cols) + " |",
             "|" + "---|" * (10 + len(cols))]
    for n, p in enumerate(points, 1):
        costs = [describe_ratio(p[c]) if c in p else "-" for c in cols]
        star = " *" if p.get("pareto_cost_small_overall") else ""
        run = p.get("experts_run", p["experts"])
        experts = f"{p['experts']}" + (f" ({run:.2f})" if abs(run - p["experts"]) > 1e-9 else "")
        lines.append(f"| {n} | {p['name']}{star} | {p['where']} | {experts} | {p['precision']} | "
                     f"{with_interval(p, 'overall')} | {_fmt(p['many'])} | {_fmt(p['medium'])} | "
                     f"{with_interval(p, 'few')} | {_fmt(p['agreement'])}% | " + " | ".join(costs) + " |")
    return lines + [""]


def not_measured_lines(result: dict) -> list[str]:
    """Every figure the run did not get, and why: in-process batches and served runs short of rounds, served sweep
    points whose windows caught too few requests. None of them is in a table, a ratio, a plot or the Pareto front."""
    sweep = (result.get("served") or {}).get("sweep", [])
    why = result.get("not_measured", []) + [
        f"served {r['model']} over {r['protocol']} at concurrency {r['concurrency']}: {r['not_measured']}"
        for r in sweep if not r.get("measured", True)]
    return ["## Not measured", "", *[f"- {w}" for w in why], ""] if why else []


def ratios_table(ratios: list[dict]) -> list[str]:
    if not ratios:
        return []
    lines = ["## Ratios (latency, numerator / denominator, ratio of medians from one interleaved run)", "",
             "| ratio | where | batch | value [95% interval] samples |", "|---|---|---|---|"]
    lines += [f"| {r['ratio_name']} | {r.get('runtime') or r.get('protocol')} | {r['batch']} | {bold_if_reliable(r)} |"
              for r in ratios]
    return lines + [""]


def latency_table(result: dict) -> list[str]:
    timed = [r for r in inprocess_rows(result) if "p50_ms" in r]
    images = result["evaluation"].get("timed_images")
    lines = ["## In-process latency (absolute)", "",
             (f"Timed on {images} images of the {result['evaluation']['source']} (a fixed sample, the same for every "
              "variant; experts run = per image on them)." if images else "Timed on random images (a run before "
              "2026-12-05: an early-exit model's figure there is that of its first expert alone)."), "",
             "| variant | runtime | batch | experts run | p50 ms | p90 ms | p99 ms | images/s |",
             "|---|---|---|---|---|---|---|---|"] if timed else []
    lines += [f"| {r['variant']} | {r['runtime']} | {r['batch']} | {_fmt(r.get('experts_run_timed'), '.2f')} | "
              f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['items_per_s']:.1f} |" for r in timed]
    lines += [f"- not timed: {r['variant']} on {r['runtime']}: {r.get('refused') or r.get('skipped')}"
              for r in result["inprocess"] if "refused" in r or "skipped" in r]
    return lines + [""]


def served_tables(served: dict, p99_budget_ms: float | None = None) -> list[str]:
    if not served:
        return []
    lines = ["## Served models on the labelled set", "", "| model | role | protocol | precision | top-1 | many | medium | "
             "few | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['model']} | {m['model_role']} | {m['protocol']} | {m['precision']} | "
              + " | ".join(_fmt(m["accuracy"][g]) for g in GROUPS) + f" | {_fmt(m['accuracy']['agreement'])}% |"
              for m in served["models"] if "accuracy" in m]
    lines += [f"- refused to time served {m['model']} ({m['model_role']}) over {m['protocol']}: {m['refused']}"
              for m in served["models"] if "refused" in m]
    sweep = [r for r in served["sweep"] if r.get("measured", True)]
    if not served["sweep"]:
        lines.append(f"- **nothing served was measured**; the server has: {', '.join(served.get('server_models', []))}")
    if sweep:
        lines += ["", "| model | protocol | concurrency | img/s | p50 ms | p99 ms | server queue ms | server compute ms | "
                  "client-bound |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['throughput']:.1f} | "
                  f"{_fmt(r.get('p50_ms'), '.2f')} | {_fmt(r.get('p99_ms'), '.2f')} | {_fmt(r.get('server_queue_ms'), '.2f')} | "
                  f"{_fmt(r.get('server_compute_ms'), '.2f')} | {'yes' if r.get('client_bound') else 'no'} |" for r in sweep]
    if sweep and p99_budget_ms:
        lines += ["", f"Within the p99 budget of {p99_budget_ms:g} ms (the highest throughput whose p99 stays within it):"]
        for key in sorted({(r["model"], r["protocol"]) for r in sweep}):
            best = best_under([r for r in sweep if (r["model"], r["protocol"]) == key], p99_budget_ms)
            lines.append(f"- {key[0]} over {key[1]}: " + (f"{best['throughput']:.1f} img/s at concurrency "
                                                           f"{best['concurrency']} (p99 {best['p99_ms']:.2f} ms)"
                                                           if best else "no measured point within it"))
    return lines + [""]


def markdown(result: dict) -> str:
    """summary.md: the decision sentence and the machine first, then the cost-accuracy table, then the rest."""
    m = result["machine"]
    d = result.get("decision")
    lead = ("**" + d["sentence"] + "**" if d["reliable"] else d["sentence"]) if d else \
        "No decision: the in-process ensemble and single expert were not both measured."
    ev = result["evaluation"]
    budget = result.get("p99_budget_ms")
    lines = [f"# expertfuse bench: {result['checkpoint']}", "", lead, "",
             f"Machine: {describe_machine(m)}; torch {m['packages'].get('torch')}, onnxruntime "
             f"{m['packages'].get('onnxruntime') or m['packages'].get('onnxruntime-gpu')}", ""]
    lines += cost_accuracy_table(result)
    lines += [f"Scored on the {ev['source']}, shot rule {ev['shot_rule']}. Chosen on the {ev['chosen_on']} (disjoint): "
              f"'single' = the best expert by top-1 there, {result['single']}; the best-k subsets, and every "
              f"early-exit and INT8 model's choices.", ""]
    lines += not_measured_lines(result) + ratios_table(result["ratios"]) + latency_table(result)
    lines += served_tables(result["served"], budget)
    lines += ["Plots: " + ", ".join(result.get("plots", [])), ""]
    return "\n".join(lines)


def write_all(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if result["points"]:
        plots.append(out / "cost_accuracy.png")
        save_figure(cost_accuracy_figure(result["points"]), plots[-1], layout=False)
    sweep = [r for r in (result["served"] or {}).get("sweep", []) if r.get("measured", True) and "p99_ms" in r]
    if sweep:
        plots.append(out / "served_latency_throughput.png")
        save_figure(served_curves_figure(sweep, result.get("p99_budget_ms")), plots[-1])
    result["plots"] = [p.name for p in plots]  # named relative to the run's folder, as every file of a report
    write_text(out / "bench.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(out / "summary.md", markdown(result))
    write_csv(point_rows(result["points"]), out / "cost_accuracy.csv")
    write_csv(ratio_rows(result["ratios"]), out / "ratios.csv")
    write_csv(inprocess_rows(result), out / "inprocess.csv")
    write_csv((result["served"] or {}).get("sweep", []), out / "served.csv")
    return [out / n for n in ("bench.json", "summary.md", "cost_accuracy.csv", "ratios.csv", "inprocess.csv",
                              "served.csv")] + plots


def upgrade(result: dict) -> dict:
    """A bench.json written by earlier code, with what today's report derives from it (nothing is measured anew):
    each cost's reliability flag, the Pareto front without UNRELIABLE costs, the decision sentence, and served
    points whose windows caught fewer than MIN_WINDOW_REQUESTS requests marked not measured."""
    if "chosen_on" not in result["evaluation"]:
        raise UserError("this run predates the calibration split (its best expert was chosen on the split it is "
                        "scored on): rerun the bench")
    window_s = float(result["settings"].get("window_s", 1.0))
    for r in (result.get("served") or {}).get("sweep", []):
        counts = [round(t * window_s / r.get("batch", 1)) for t in r.get("window_throughputs", [])]
        if "measured" not in r and counts and min(counts) < MIN_WINDOW_REQUESTS:
            for key in [k for k in r if k == "throughput" or k.startswith(("p5", "p9", "server_"))]:
                del r[key]
            r.update(measured=False, stable=False, not_measured=f"a {window_s:g} s window completed {min(counts)} "
                                                               f"requests (at least {MIN_WINDOW_REQUESTS} needed)")
    for p in result["points"]:
        cols = cost_columns(p)
        p.setdefault("cost_small_reliable", p[cols[0]]["reliable"])
        p.setdefault("cost_large_reliable", p[cols[-1]]["reliable"] if p.get("cost_large") is not None else False)
    mark_pareto(result["points"])
    old = result.get("decision")
    if old:
        gains = lambda a, b: {acc: {"ci95": ci} for acc, ci in old["gain_ci95"].items()}  # noqa: E731
        result["decision"] = decision(result["points"], result["ratios"], result["single"], gains,
                                      float(result["settings"]["budget_s"]))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description="Rewrite a bench run's summary.md, CSV "
                                "files and plots from its bench.json with today's report code (measures nothing).")
    p.add_argument("runs", type=Path, nargs="+", help="folders holding a bench.json")
    for run in p.parse_args(argv).runs:
        try:
            result = json.loads((run / "bench.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{run}: no readable bench.json ({exc})") from None
        print("wrote " + ", ".join(str(f) for f in write_all(upgrade(result), run)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
