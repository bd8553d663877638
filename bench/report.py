"""The report a user decides from: summary.md led by the decision sentence, the cost-accuracy table and plot
(Pareto front marked), every ratio with its interval (unreliable ones flagged, never bold), absolute latencies,
served accuracy and latency-throughput curves; bench.json and CSV files carry everything."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from expertfuse.files import atomic_path, write_text  # noqa: E402
from expertfuse.timing import describe_ratio  # noqa: E402
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


def save_figure(fig, path: Path) -> None:
    """A figure as PNG, laid out and written atomically, then closed."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_cost_accuracy(points: list[dict], path: Path) -> None:
    """2 x 2: cost at batch 1 / at the largest batch (x, relative to the best expert) against top-1 overall / few."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False)
    for col, cost in enumerate(("cost_small", "cost_large")):
        for row, acc in enumerate(("overall", "few")):
            ax = axes[row][col]
            shown = [p for p in points if p.get(cost) is not None and p.get(acc) == p.get(acc)]
            for p in shown:
                ax.scatter(p[cost], p[acc], marker="s" if p["where"].startswith("triton") else "o", s=30)
                ax.annotate(p["name"], (p[cost], p[acc]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            front = sorted((p[cost], p[acc]) for p in shown if p.get(f"pareto_{cost}_{acc}"))
            if front:
                ax.plot(*zip(*front), color="tab:red", linestyle="--", linewidth=1, label="Pareto front")
                ax.legend(fontsize=7)
            ax.axvline(1, color="gray", linewidth=0.6)
            ax.set(xlabel=f"cost relative to the best expert ({'batch 1 latency' if col == 0 else 'largest batch'})",
                   ylabel=f"top-1 {acc} (%)")
            ax.grid(True, alpha=0.3)
    fig.suptitle("What each variant buys (accuracy) for what it costs")
    save_figure(fig, path)


def plot_early_exit_curve(record: dict, path: Path) -> None:
    """Experts run per image (x) against top-1 overall and on the tail group (y) for every global threshold, on the
    calibration split (where auto chose) and on the evaluation split (where it is scored), with the full ensemble's
    accuracy, the tolerance band and the chosen setting marked."""
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
        ax.axhline(band, color="tab:blue", linestyle="--", linewidth=0.8, label=f"tolerance ({auto['tolerance_points']:g})")
        ax.set(xlabel="experts run per image", ylabel=f"top-1 {group} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Early exit: chosen on {record['splits']['chosen_on']}\nscored on {record['splits']['scored_on']}",
                 fontsize=8)
    save_figure(fig, path)


def plot_served_curves(sweep: list[dict], path: Path) -> None:
    """Throughput (x) against p99 latency (y) over the concurrency sweep, one line per model and protocol."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["model"], r["protocol"]) for r in sweep}):
        pts = sorted((r["concurrency"], r["throughput"], r["p99_ms"]) for r in sweep if (r["model"], r["protocol"]) == key)
        _, xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=f"{key[0]} / {key[1]}")
        for c, x, y in pts:
            ax.annotate(f"c{c}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="throughput (images/s)", ylabel="p99 latency (ms)", title="Served: latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def cost_accuracy_table(result: dict) -> list[str]:
    points = result["points"]
    if not points:
        return []
    cols = list(dict.fromkeys(c for p in points for c in cost_columns(p)))
    lines = ["## Cost and accuracy", "", f"Cost is latency relative to the best single expert ({result['single']}) in "
             "the same interleaved run (at the largest batch: 1 / throughput); * marks the Pareto front "
             "(cost at batch 1 against overall top-1).", "",
             "| variant | where | experts (run per image) | precision | top-1 | many | medium | few | agrees with PyTorch "
             "ensemble | " + " | ".join(f"cost at batch {c[6:]}" for c in cols) + " |", "|" + "---|" * (9 + len(cols))]
    for p in points:
        costs = [describe_ratio(p[c]) if c in p else "-" for c in cols]
        star = " *" if p.get("pareto_cost_small_overall") else ""
        run = p.get("experts_run", p["experts"])
        experts = f"{p['experts']}" + (f" ({run:.2f})" if abs(run - p["experts"]) > 1e-9 else "")
        lines.append(f"| {p['name']}{star} | {p['where']} | {experts} | {p['precision']} | "
                     + " | ".join(_fmt(p[g]) for g in GROUPS) + f" | {_fmt(p['agreement'])}% | " + " | ".join(costs) + " |")
    return lines + [""]


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
    lines = ["## In-process latency (absolute)", "", "| variant | runtime | batch | p50 ms | p90 ms | p99 ms | images/s |",
             "|---|---|---|---|---|---|---|"] if timed else []
    lines += [f"| {r['variant']} | {r['runtime']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['items_per_s']:.1f} |" for r in timed]
    lines += [f"- not timed: {r['variant']} on {r['runtime']}: {r.get('refused') or r.get('skipped')}"
              for r in result["inprocess"] if "refused" in r or "skipped" in r]
    return lines + [""]


def served_tables(served: dict) -> list[str]:
    if not served:
        return []
    lines = ["## Served models on the labelled set", "", "| model | role | protocol | precision | top-1 | many | medium | "
             "few | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['model']} | {m['model_role']} | {m['protocol']} | {m['precision']} | "
              + " | ".join(_fmt(m["accuracy"][g]) for g in GROUPS) + f" | {_fmt(m['accuracy']['agreement'])}% |"
              for m in served["models"] if "accuracy" in m]
    lines += [f"- refused to time served {m['model']} ({m['model_role']}) over {m['protocol']}: {m['refused']}"
              for m in served["models"] if "refused" in m]
    sweep = served["sweep"]
    if not sweep:
        lines.append(f"- **nothing served was measured**; the server has: {', '.join(served.get('server_models', []))}")
    if sweep:
        lines += ["", "| model | protocol | concurrency | img/s | p50 ms | p99 ms | server queue ms | server compute ms | "
                  "client-bound |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['throughput']:.1f} | "
                  f"{_fmt(r.get('p50_ms'), '.2f')} | {_fmt(r.get('p99_ms'), '.2f')} | {_fmt(r.get('server_queue_ms'), '.2f')} | "
                  f"{_fmt(r.get('server_compute_ms'), '.2f')} | {'yes' if r.get('client_bound') else 'no'} |" for r in sweep]
    return lines + [""]


def markdown(result: dict) -> str:
    m = result["machine"]
    d = result.get("decision")
    lead = ("**" + d["sentence"] + "**" if d["reliable"] else d["sentence"] + " (not a headline: a cost interval is "
            "wider than +-10%)") if d else "No decision: the in-process ensemble and single expert were not both measured."
    ev = result["evaluation"]
    lines = [f"# expertfuse bench: {result['checkpoint']}", "", lead, "",
             f"Scored on the {ev['source']}, shot rule {ev['shot_rule']}. Chosen on the {ev['chosen_on']} (disjoint): "
             f"'single' = the best expert by top-1 there, {result['single']}; the best-k subsets, and every "
             f"early-exit and INT8 model's choices.", f"Machine: {describe_machine(m)}; torch "
             f"{m['packages'].get('torch')}, onnxruntime {m['packages'].get('onnxruntime') or m['packages'].get('onnxruntime-gpu')}", ""]
    lines += cost_accuracy_table(result) + ratios_table(result["ratios"]) + latency_table(result)
    lines += served_tables(result["served"])
    lines += ["Plots: " + ", ".join(Path(p).name for p in result.get("plots", [])), ""]
    return "\n".join(lines)


def write_all(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if result["points"]:
        plots.append(out / "cost_accuracy.png")
        plot_cost_accuracy(result["points"], plots[-1])
    sweep = [r for r in (result["served"] or {}).get("sweep", []) if "p99_ms" in r]
    if sweep:
        plots.append(out / "served_latency_throughput.png")
        plot_served_curves(sweep, plots[-1])
    result["plots"] = [str(p) for p in plots]
    write_text(out / "bench.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(out / "summary.md", markdown(result))
    write_csv(point_rows(result["points"]), out / "cost_accuracy.csv")
    write_csv(ratio_rows(result["ratios"]), out / "ratios.csv")
    write_csv(inprocess_rows(result), out / "inprocess.csv")
    write_csv((result["served"] or {}).get("sweep", []), out / "served.csv")
    return [out / n for n in ("bench.json", "summary.md", "cost_accuracy.csv", "ratios.csv", "inprocess.csv",
                              "served.csv")] + plots
