"""python -m bench.tune: search the Triton config of one model (what model_analyzer does, for our models).

  python -m bench.tune --repository model_repository --model ncl [--latency-budget-ms 20]
      [--instances 1,2] [--max-batch-sizes 8,32] [--preferred-batch-sizes none,max] [--queue-delays-us 0,1000]
      [--concurrency 2,8,32] [--protocol grpc] [--server auto] [--variant NAME] [--out bench/results/tune-latest]

One Triton is started with explicit model control and only this model; every point of the grid (instance
count x max_batch_size x preferred batch sizes x max queue delay) is a reload of the model with an override
config (the served config with those fields changed), so the server is never restarted. Each config is measured
at every concurrency with the bench's load generator. The best point under the budget (highest throughput whose
p99 stays within it) is written back through the repository writer as a named variant, `<model>_tuned`: a new
model name sharing the artifact (hard links). A variant rather than a new version because Triton keeps one
config.pbtxt per model: a version could not carry its own batching and instances, and the exported config stays
as it was for comparison. Writes tune.csv, tune.md, tune.json and latency_throughput.png of every point.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as pb

from bench.measure.machine import machine_info
from bench.measure.served import best_under, default_client_processes, measure_point
from bench.measure.timed_images import random_images
from expertfuse.cli import (non_negative_int_list, positive_float, positive_int, positive_int_list, run_cli,
                            unwind_on_signals)
from expertfuse.contract import EXPERTS_RUN, INPUT, check_model_name
from expertfuse.errors import NothingMeasured, UserError
from expertfuse.files import report_name, report_settings, write_text
from serve.protocols import PROTOCOLS
from serve.repository import LABELS_FILE, RepositoryError, read_config, staging, versions, write_model
from serve.server import SERVERS, ServerError, TritonServer, choose_server, describe_exit

# matplotlib is imported where used and torch never: the load generator's spawned client processes re-import this
# module, and on a busy 2-core machine torch's import alone outlasted a measured window.


@dataclass(frozen=True)
class Point:
    """One Triton config of the model: the fields the search changes."""
    instances: int
    max_batch: int
    preferred: tuple[int, ...]
    queue_delay_us: int

    @property
    def label(self) -> str:
        preferred = "+".join(map(str, self.preferred)) or "-"
        return f"i{self.instances} b{self.max_batch} p{preferred} d{self.queue_delay_us}"


def preferred_sizes(token: str, max_batch: int) -> tuple[int, ...]:
    """'none' -> (), 'max' -> (max_batch,), '4+8' -> (4, 8) (sizes above max_batch dropped)."""
    if token == "none":
        return ()
    if token == "max":
        return (max_batch,)
    try:
        sizes = tuple(sorted({int(s) for s in token.split("+")}))
    except ValueError:
        raise UserError(f"--preferred-batch-sizes: each entry is none, max or sizes like 4+8; got {token!r}") from None
    return tuple(s for s in sizes if 0 < s <= max_batch)


def grid(instances: list[int], max_batches: list[int], preferred: list[str], delays: list[int]) -> list[Point]:
    points = {Point(i, b, preferred_sizes(p, b), d) for i in instances for b in max_batches for p in preferred
              for d in delays}
    return sorted(points, key=lambda p: (p.instances, p.max_batch, p.preferred, p.queue_delay_us))


def apply(cfg: pb.ModelConfig, point: Point) -> pb.ModelConfig:
    """A copy of `cfg` with the point's batching and instances. Warmup samples above the new max_batch_size are
    dropped (Triton fails such a warmup, and the bundled server crashed on it) and one at the maximum added."""
    tuned = pb.ModelConfig()
    tuned.CopyFrom(cfg)
    tuned.max_batch_size = point.max_batch
    for group in tuned.instance_group:
        group.count = point.instances
    tuned.dynamic_batching.max_queue_delay_microseconds = point.queue_delay_us
    tuned.dynamic_batching.ClearField("preferred_batch_size")
    tuned.dynamic_batching.preferred_batch_size.extend(point.preferred)
    kept = [w for w in tuned.model_warmup if w.batch_size <= point.max_batch]
    if kept and all(w.batch_size != point.max_batch for w in kept):
        top = pb.ModelWarmup()
        top.CopyFrom(kept[-1])
        top.name, top.batch_size = f"batch{point.max_batch}", point.max_batch
        kept.append(top)
    del tuned.model_warmup[:]
    tuned.model_warmup.extend(kept)
    return tuned


class ExplicitTriton(TritonServer):
    """A TritonServer with explicit model control, loading only the tuned model at start."""

    def __init__(self, repository: Path, mode: str, model: str, **kwargs):
        super().__init__(repository, mode, **kwargs)
        self.model = model

    def _args(self, repository: str) -> list[str]:
        return [*super()._args(repository), "--model-control-mode=explicit", f"--load-model={self.model}"]


def check_model(repository: Path, model: str, max_batches: list[int]) -> tuple[pb.ModelConfig, int]:
    """The model's exported config and image size; refuses what the bench's load generator cannot drive."""
    try:
        cfg = read_config(Path(repository) / check_model_name(model))
    except RepositoryError as exc:
        raise UserError(f"{exc} (is {model!r} in {repository}?)") from None
    image = cfg.input[0] if len(cfg.input) == 1 else None
    if image is None or image.name != INPUT or image.data_type != pb.TYPE_UINT8 or list(image.dims)[2:] != [3]:
        raise UserError(f"{model}: the load generator sends UINT8 NHWC '{INPUT}' images; export with --input uint8-nhwc")
    if any(output.name == EXPERTS_RUN for output in cfg.output):
        raise UserError(f"{model} is an early-exit model: its cost depends on the images it gets, and tune sends random "
                        "images (every one leaves after the first expert); tune its fused ensemble instead")
    if cfg.max_batch_size < 1 or not cfg.HasField("dynamic_batching"):
        raise UserError(f"{model}: no dynamic batching in its config, nothing to tune")
    too_big = [b for b in max_batches if b > cfg.max_batch_size or b < 1]
    if too_big:
        raise UserError(f"--max-batch-sizes {too_big}: must be within 1..{cfg.max_batch_size}, the model's exported "
                        "max_batch_size (the artifact is built and parity-checked up to it)")
    return cfg, int(image.dims[0])


def load(server: TritonServer, model: str, cfg: pb.ModelConfig, timeout: float) -> None:
    """Reload the model with `cfg` as its override config (no server restart)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    try:
        client.load_model(model, config=json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                          client_timeout=timeout)
    finally:
        client.close()


def served_config(server: TritonServer, model: str) -> pb.ModelConfig:
    """The config the server runs (for the bundled server, its python-backend form of the exported one)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    try:
        return client.get_model_config(model).config
    finally:
        client.close()


def check_running(server: TritonServer, doing: str) -> None:
    """ServerError naming what was under way and the server's last words when the server is gone (a request can
    fail a moment before its server is reaped: it gets a second to exit)."""
    try:
        code = server.process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return
    raise ServerError(f"Triton {describe_exit(code)} while {doing}: {server.failure_reason()}")


def sweep(server: TritonServer, args, points: list[Point], image_size: int, log=print) -> list[dict]:
    """Every point at every concurrency; a point whose load or requests fail is recorded, not fatal."""
    base, rows, images = served_config(server, args.model), [], random_images(image_size)
    url = server.endpoints.grpc if args.protocol == "grpc" else server.endpoints.http
    for n, point in enumerate(points, 1):
        fields = {"config": point.label, **asdict(point), "preferred": "+".join(map(str, point.preferred))}
        try:
            load(server, args.model, apply(base, point), args.load_timeout)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
            check_running(server, f"loading config {point.label}")
            rows.append({**fields, "error": str(exc).splitlines()[0]})
            log(f"[{n}/{len(points)}] {point.label}: load failed: {rows[-1]['error']}", flush=True)
            continue
        for c in args.concurrency:
            try:
                row = measure_point(url, args.protocol, args.model, images, 1, c, args.window_s, log,
                                    max_processes=args.client_processes)
            except Exception as exc:  # noqa: BLE001 - failed requests, or tritonclient's errors on statistics
                check_running(server, f"measuring config {point.label} at concurrency {c}")
                row = {"error": str(exc).splitlines()[0]}
            if not row.get("measured", False) and "error" not in row:
                row = {"error": f"not measured: {row['not_measured']}", **row}
            rows.append({**fields, "concurrency": c, **{k: v for k, v in row.items() if k != "window_throughputs"}})
            log(f"[{n}/{len(points)}] {point.label:<24} c={c:<3} " + (f"error: {row['error']}" if "error" in row else
                f"{row['throughput']:8.1f} img/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                f"exec/req {row['server_exec_per_request']:.2f}{'' if row['stable'] else '  (unstable)'}"), flush=True)
    return rows


def link_or_copy(source: Path, target: Path) -> None:
    """Hard links share the artifact without copying it; a copy where a link is impossible (another file system)."""
    def one(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=one)
    else:
        one(source, target)


def write_variant(repository: Path, model: str, point: Point, name: str) -> tuple[Path, int]:
    """`name`: the model's exported config with the point applied, sharing its latest version's files, written by
    the repository writer (replacing an earlier variant of that name)."""
    source = Path(repository) / model
    cfg = apply(read_config(source), point)
    cfg.name = check_model_name(name)
    labels = (source / LABELS_FILE).read_text().splitlines() if (source / LABELS_FILE).is_file() else None
    with staging(Path(repository)) as work:
        for item in (source / str(versions(source)[-1])).iterdir():
            link_or_copy(item, work / item.name)
        return write_model(repository, cfg, {p.name: p for p in work.iterdir()}, labels, overwrite=True)


COLUMNS = ["config", "instances", "max_batch", "preferred", "queue_delay_us", "concurrency", "throughput", "p50_ms",
           "p90_ms", "p95_ms", "p99_ms", "server_queue_ms", "server_compute_ms", "server_exec_per_request", "stable",
           "client_bound", "within_budget", "error"]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value in (None, "") else str(value)


def markdown(result: dict) -> str:
    from bench.measure.machine import describe_machine
    m, best, budget = result["machine"], result["best"], result["latency_budget_ms"]
    lines = [f"# Triton config search: {result['model']}", "",
             f"Machine: {describe_machine(m)}; server: {result['server']}; "
             f"protocol {result['protocol']}, 1 image per request, windows of {result['window_s']} s. Load average "
             f"(1 min) {result['load_average_1_5_15min']['before'][0]:.1f} before the sweep, "
             f"{result['load_average_1_5_15min']['after'][0]:.1f} after.", "",
             f"> {result['note']}", "", f"## Best under the budget: p99 <= {budget} ms", ""]
    if best:
        lines.append(f"**{best['config']}** at concurrency {best['concurrency']}: {best['throughput']:.1f} img/s, "
                     f"p99 {best['p99_ms']:.2f} ms -> written as model `{result['variant']}` "
                     f"version {result['variant_version']} (a variant sharing `{result['model']}`'s artifact).")
    else:
        lines.append("No point kept its p99 within the budget; nothing was written.")
    lines += ["", "Config: i = instances, b = max_batch_size, p = preferred batch sizes, d = max queue delay (us).", "",
              "## Every point", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in COLUMNS) + " |" for r in result["rows"]]
    return "\n".join(lines + ["", "Plot: latency_throughput.png", ""])


def plot(rows: list[dict], best: dict | None, budget: float, path: Path) -> None:
    """p99 latency against throughput, one line per config through its concurrency levels."""
    import matplotlib.pyplot as plt

    from bench.report import save_figure
    fig, ax = plt.subplots(figsize=(8, 5))
    measured = [r for r in rows if "p99_ms" in r]
    for label in dict.fromkeys(r["config"] for r in measured):
        pts = sorted((r["concurrency"], r["throughput"], r["p99_ms"]) for r in measured if r["config"] == label)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", markersize=4, label=label)
    ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget} ms")
    if best:
        ax.scatter([best["throughput"]], [best["p99_ms"]], s=250, facecolors="none", edgecolors="black", zorder=5,
                   label=f"best: {best['config']} c={best['concurrency']}")
    ax.set(xlabel="throughput (images/s)", ylabel="p99 latency (ms)", yscale="log",
           title="Triton config search: latency vs throughput (each line: one config, concurrency rising)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def write_results(result: dict, out: Path) -> list[Path]:
    from bench.report import write_csv
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "tune.json", out / "tune.csv", out / "tune.md", out / "latency_throughput.png"]
    write_text(files[0], json.dumps(result, indent=2, default=str) + "\n")
    write_csv(result["rows"], files[1], COLUMNS)
    write_text(files[2], markdown(result))
    plot(result["rows"], result["best"], result["latency_budget_ms"], files[3])
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", required=True, help="the model to tune (e.g. ncl)")
    p.add_argument("--latency-budget-ms", type=positive_float, default=20.0, help="p99 latency budget [20]")
    p.add_argument("--instances", type=positive_int_list, default=[1, 2], help="instance counts [1,2]")
    p.add_argument("--max-batch-sizes", type=positive_int_list, default=[8, 32], help="max_batch_size values [8,32]")
    p.add_argument("--preferred-batch-sizes", default="none",
                   help="comma list of: none | max | sizes joined by + (e.g. none,max,4+8) [none]")
    p.add_argument("--queue-delays-us", type=non_negative_int_list, default=[0, 1000], help="max queue delays in us [0,1000]")
    p.add_argument("--concurrency", type=positive_int_list, default=[2, 8, 32], help="client concurrency levels [2,8,32]")
    p.add_argument("--protocol", default="grpc", choices=PROTOCOLS)
    p.add_argument("--server", default="auto", choices=SERVERS, help="which Triton to start [auto]")
    p.add_argument("--window-s", type=positive_float, default=1.0, help="length of one measured window [1.0]")
    p.add_argument("--client-processes", type=positive_int,
                   help=f"most client processes generating load [half the cores: {default_client_processes()}]")
    p.add_argument("--ready-timeout", type=positive_float, default=180.0, help="seconds for Triton to start [180]")
    p.add_argument("--load-timeout", type=positive_float, default=180.0, help="seconds for one model reload [180]")
    p.add_argument("--variant", help="name of the tuned model written back [<model>_tuned]")
    p.add_argument("--out", type=Path, default=Path("bench/results/tune-latest"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    unwind_on_signals()
    variant = check_model_name(args.variant or f"{args.model}_tuned")
    if variant == args.model:
        raise UserError("--variant must differ from --model (the exported config stays as it was)")
    _, image_size = check_model(args.repository, args.model, args.max_batch_sizes)
    points = grid(args.instances, args.max_batch_sizes, args.preferred_batch_sizes.split(","), args.queue_delays_us)
    try:
        mode, why = choose_server(args.server)
        print(f"server: {mode} ({why}); {len(points)} configs x concurrency {args.concurrency}", flush=True)
        load_before = os.getloadavg()
        with ExplicitTriton(args.repository, mode, args.model, ready_timeout=args.ready_timeout) as server:
            rows = sweep(server, args, points, image_size)
        load_after = os.getloadavg()
    except ServerError as exc:
        raise UserError(str(exc)) from None
    for row in rows:
        row["within_budget"] = "p99_ms" in row and row["p99_ms"] <= args.latency_budget_ms
    best = best_under(rows, args.latency_budget_ms)
    written = write_variant(args.repository, args.model, {p.label: p for p in points}[best["config"]], variant) \
        if best else (None, None)
    result = {"model": args.model, "server": mode, "protocol": args.protocol, "latency_budget_ms": args.latency_budget_ms,
              "window_s": args.window_s, "machine": machine_info(),
              "load_average_1_5_15min": {"before": load_before, "after": load_after},
              "settings": report_settings(args, args.out),
              "note": "Measured with client and server on the same machine; on a shared, noisy machine absolute figures "
                      "drift (2x within minutes) and close points can swap places: re-run before trusting a ranking.",
              "best": best, "variant": variant if best else None, "variant_version": written[1],
              "variant_path": report_name(written[0], args.repository.parent) if best else None, "rows": rows}
    files = write_results(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    if all("error" in row for row in rows):
        raise NothingMeasured(f"every point failed (first: {rows[0]['config']}: {rows[0]['error']}); see {files[2]}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
