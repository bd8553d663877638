"""Results as a paper would show them: a stdout table, JSON and CSV (with the machine and every setting),
PNG plots, and a markdown summary with the headline figures."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def headline(inprocess: list[dict], served: list[dict]) -> dict:
    """Ensemble cost t_ensemble/t_single per runtime and batch; fused-vs-naive served speedup;
    served/in-process throughput ratio (best served fused vs best ONNX Runtime CPU/CUDA fused)."""
    timed = [r for r in inprocess if "p50_ms" in r]
    single = {(r["runtime"], r["batch"]): r["p50_ms"] for r in timed if r["variant"] == "single"}
    cost = [{"runtime": r["runtime"], "batch": r["batch"], "variant": r["variant"],
             "cost_ratio": r["p50_ms"] / single[(r["runtime"], r["batch"])]}
            for r in timed if r["variant"] != "single" and (r["runtime"], r["batch"]) in single]
    by_key = {(r["model_role"], r["protocol"], r["concurrency"]): r["throughput"] for r in served if "throughput" in r}
    speedup = [{"protocol": p, "concurrency": c, "fused_vs_naive": t / by_key[("naive", p, c)]}
               for (role, p, c), t in by_key.items() if role == "fused" and by_key.get(("naive", p, c))]
    fused_served = max((t for (role, _, _), t in by_key.items() if role == "fused"), default=None)
    fused_local = max((r["items_per_s"] for r in timed if r["variant"] != "single" and r["runtime"].startswith("onnxruntime")),
                      default=None)
    return {"ensemble_cost": cost, "fused_vs_naive": speedup,
            "served_over_inprocess": fused_served / fused_local if fused_served and fused_local else None,
            "best_served_fused_img_s": fused_served, "best_inprocess_fused_img_s": fused_local}


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(inprocess: list[dict], served: list[dict], heads: dict, out: Path) -> list[Path]:
    paths = []
    timed = [r for r in inprocess if "p50_ms" in r]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({(r["variant"], r["runtime"]) for r in timed}):
            pts = sorted((r["batch"], r["items_per_s"]) for r in timed if (r["variant"], r["runtime"]) == key)
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]} / {key[1]}")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title="In-process throughput vs batch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "throughput_vs_batch.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    points = [r for r in served if "p50_ms" in r]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({(r["model_role"], r["protocol"]) for r in points}):
            pts = sorted((r["concurrency"], r["p50_ms"], r["p99_ms"]) for r in points if (r["model_role"], r["protocol"]) == key)
            xs, p50, p99 = zip(*pts)
            line, = ax.plot(xs, p50, marker="o", label=f"{key[0]} / {key[1]} p50")
            ax.plot(xs, p99, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{key[0]} / {key[1]} p99")
        ax.set(xlabel="concurrency", ylabel="latency (ms)", title="Triton latency vs concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "latency_vs_concurrency.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if heads["ensemble_cost"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [f"{c['runtime']}\n{c['variant'].removeprefix('ensemble-')} b{c['batch']}" for c in heads["ensemble_cost"]]
        ax.bar(range(len(labels)), [c["cost_ratio"] for c in heads["ensemble_cost"]], color="tab:orange")
        experts = max((r["experts"] for r in inprocess), default=1)
        ax.axhline(experts, color="gray", linestyle="--", label=f"{experts}x (no fusion gain)")
        ax.axhline(1, color="black", linewidth=0.8, label="single expert")
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=60)
        ax.set(ylabel="t_ensemble / t_single", title="What the ensemble costs")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "single_vs_ensemble.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(result: dict) -> str:
    lines = [f"# expertfuse bench: {result['checkpoint']}", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), GPU: {result['machine']['gpu'] or 'none'}; "
             f"torch {result['machine']['packages'].get('torch')}, onnxruntime "
             f"{result['machine']['packages'].get('onnxruntime') or result['machine']['packages'].get('onnxruntime-gpu')}", ""]
    timed = [r for r in result["inprocess"] if "p50_ms" in r]
    if timed:
        lines += ["## In-process", "", "| variant | runtime | batch | p50 ms | p99 ms | images/s | stable |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['runtime']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['items_per_s']:.1f} | {'yes' if r['stable'] else 'no'} |" for r in timed]
    lines += [f"- refused to time {r['variant']} on {r['runtime']}: {r['refused']}" for r in result["inprocess"] if "refused" in r]
    served = [r for r in result["served"] if "throughput" in r]
    if served:
        lines += ["", "## Served (Triton)", "", "| model | role | protocol | concurrency | img/s | p50 ms | p90 ms | p95 ms | p99 ms | "
                  "server queue ms | server compute ms | exec/request | client-bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['model_role']} | {r['protocol']} | {r['concurrency']} | {r['throughput']:.1f} | "
                  f"{_fmt(r.get('p50_ms'))} | {_fmt(r.get('p90_ms'))} | {_fmt(r.get('p95_ms'))} | {_fmt(r.get('p99_ms'))} | "
                  f"{_fmt(r.get('server_queue_ms'))} | {_fmt(r.get('server_compute_ms'))} | "
                  f"{_fmt(r.get('server_exec_per_request'))} | {'yes' if r.get('client_bound') else 'no'} |" for r in served]
    lines += [f"- refused to time served {r['model']} ({r['model_role']}) over {r['protocol']}: {r['refused']}"
              for r in result["served"] if "refused" in r]
    h = result["headline"]
    lines += ["", "## Headline", ""]
    lines += [f"- ensemble cost t_ensemble/t_single, {c['variant']} on {c['runtime']} at batch {c['batch']}: "
              f"**{c['cost_ratio']:.2f}x**" for c in h["ensemble_cost"]]
    lines += [f"- fused vs naive Triton ensemble, {s['protocol']} at concurrency {s['concurrency']}: "
              f"**{s['fused_vs_naive']:.2f}x** throughput" for s in h["fused_vs_naive"]]
    if h["served_over_inprocess"]:
        lines.append(f"- served / in-process throughput (best fused): **{h['served_over_inprocess']:.2f}** "
                     f"({h['best_served_fused_img_s']:.0f} vs {h['best_inprocess_fused_img_s']:.0f} img/s)")
    lines += ["", "Plots: " + ", ".join(Path(p).name for p in result["plots"]), ""]
    return "\n".join(lines)


def write_all(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plot(result["inprocess"], result["served"], result["headline"], out)]
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_csv(result["inprocess"], out / "inprocess.csv")
    write_csv(result["served"], out / "served.csv")
    (out / "summary.md").write_text(markdown(result))
    return [out / "bench.json", out / "inprocess.csv", out / "served.csv", out / "summary.md", *map(Path, result["plots"])]
