"""python -m bench.served_compare: our Python load generator against perf_analyzer on the same Triton.

  python -m bench.served_compare --repository model_repository --models ncl,ncl_expert0
      [--protocols grpc,http] [--concurrency 1,4,16] [--rounds 2] [--window-s 2] [--perf-analyzer PATH]
      [--out bench/results/served-vs-perf-analyzer]

One Triton (chosen as the bench chooses it) serves the repository; every model, protocol and concurrency is
measured by both generators at batch 1, in rounds whose order alternates (perf_analyzer first in odd rounds), so a
load on the machine hits both alike. Writes comparison.json, comparison.csv and README.md (the table, the command,
the machine and its load average before and after) to --out; no machine path is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from bench.measure.machine import describe_machine, machine_info
from bench.report import write_csv
from bench.measure.served import find_perf_analyzer, measure_concurrency, perf_analyzer_point
from bench.measure.timed_images import random_images
from expertfuse.cli import choice_list, name_list, positive_float, positive_int, positive_int_list, run_cli
from expertfuse.errors import UserError
from expertfuse.files import write_text
from serve.protocols import PROTOCOLS
from serve.repository import RepositoryError, read_config
from serve.server import SERVERS, TritonServer, choose_server

AGREE = 0.10  # the bar: our generator within 10% of perf_analyzer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.served_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="model repository Triton serves")
    p.add_argument("--models", type=name_list, required=True, help="comma-separated served model names")
    p.add_argument("--protocols", type=choice_list(PROTOCOLS), default=list(PROTOCOLS), help="[http,grpc]")
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 4, 16], help="[1,4,16]")
    p.add_argument("--rounds", type=positive_int, default=2, help="rounds, the generators' order alternating [2]")
    p.add_argument("--window-s", type=positive_float, default=2.0, help="one measurement window [2.0]")
    p.add_argument("--client-processes", type=positive_int, help="most Python load processes [half the cores]")
    p.add_argument("--perf-analyzer", metavar="PATH", help="the perf_analyzer binary [$PERF_ANALYZER, else PATH]")
    p.add_argument("--server", default="auto", choices=SERVERS, help="which Triton to start [auto]")
    p.add_argument("--out", type=Path, default=Path("bench/results/served-vs-perf-analyzer"))
    return p


def image_size(repository: Path, model: str) -> int:
    """The model's square input side, from its config in the repository (UINT8 NHWC 'image')."""
    try:
        return int(read_config(repository / model).input[0].dims[0])
    except RepositoryError as exc:
        raise UserError(f"{exc} (is {model!r} in {repository}?)") from None


def measure_both(args, server: TritonServer, binary: str, log=print) -> list[dict]:
    """Every (round, protocol, model, concurrency) by both generators, their order alternating per round."""
    rows, images = [], {m: random_images(image_size(args.repository, m)) for m in args.models}
    with tempfile.TemporaryDirectory(prefix="expertfuse-bench-") as tmp:
        for rnd in range(1, args.rounds + 1):
            order = ("perf_analyzer", "python") if rnd % 2 else ("python", "perf_analyzer")
            for protocol in args.protocols:
                url = server.endpoints.http if protocol == "http" else server.endpoints.grpc
                for model in args.models:
                    for c in args.concurrency:
                        for generator in order:
                            row = (perf_analyzer_point(binary, url, protocol, model, images[model], 1, c, args.window_s,
                                                       Path(tmp))
                                   if generator == "perf_analyzer" else
                                   measure_concurrency(url, protocol, model, images[model], 1, c, args.window_s,
                                                       max_processes=args.client_processes))
                            rows.append({"round": rnd, **{k: v for k, v in row.items() if k != "window_throughputs"}})
                            log(f"round {rnd} {protocol:<4} {model:<14} c={c:<3} {generator:<13} "
                                f"{row['throughput']:8.1f} img/s  client {row['client_cpu_ms']:.3f} ms CPU/request"
                                f"{'  (client-bound)' if row['client_bound'] else ''}", flush=True)
    return rows


def pairs(rows: list[dict]) -> list[dict]:
    """One line per (round, protocol, model, concurrency): both throughputs and python / perf_analyzer."""
    out = []
    for r in (r for r in rows if r["load_generator"] == "python"):
        key = (r["round"], r["protocol"], r["model"], r["concurrency"])
        pa = next(p for p in rows if p["load_generator"] == "perf_analyzer"
                  and (p["round"], p["protocol"], p["model"], p["concurrency"]) == key)
        out.append({"round": r["round"], "protocol": r["protocol"], "model": r["model"], "concurrency": r["concurrency"],
                    "python": r["throughput"], "perf_analyzer": pa["throughput"],
                    "python_over_perf_analyzer": r["throughput"] / pa["throughput"],
                    "python_client_cpu_ms": r["client_cpu_ms"], "perf_analyzer_client_cpu_ms": pa["client_cpu_ms"],
                    "python_client_bound": r["client_bound"], "perf_analyzer_client_bound": pa["client_bound"]})
    return out


def markdown(result: dict) -> str:
    rows, lines = result["pairs"], []
    within = [p for p in rows if abs(p["python_over_perf_analyzer"] - 1) <= AGREE]
    outside = [p for p in rows if abs(p["python_over_perf_analyzer"] - 1) > AGREE]
    flagged = [p for p in outside if p["python_client_bound"]]
    load = result["load_average_1_5_15min"]
    lines += ["# Served throughput: our Python load generator against perf_analyzer", "",
              f"Machine: {describe_machine(result['machine'])}; {result['perf_analyzer']}; Triton: {result['server']}; "
              f"repository: {result['repository']}, batch 1; {result['settings']['rounds']} rounds of "
              f"{result['settings']['window_s']:g} s windows, the generators' order alternating.",
              f"Load average (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load['before'])} before, "
              f"{' / '.join(f'{v:.2f}' for v in load['after'])} after.", "",
              f"Command: `{result['command']}`", "",
              f"Python within {AGREE:.0%} of perf_analyzer: {len(within)} of {len(rows)} measurements; of the "
              f"{len(outside)} outside, {len(flagged)} are marked client-bound.", "",
              "| round | protocol | model | concurrency | perf_analyzer img/s | python img/s | python / perf_analyzer | "
              "client CPU ms/request (python, perf_analyzer) | client-bound (python, perf_analyzer) |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['round']} | {p['protocol']} | {p['model']} | {p['concurrency']} | {p['perf_analyzer']:.0f} | "
              f"{p['python']:.0f} | {p['python_over_perf_analyzer']:.2f} | {p['python_client_cpu_ms']:.3f}, "
              f"{p['perf_analyzer_client_cpu_ms']:.3f} | {'yes' if p['python_client_bound'] else 'no'}, "
              f"{'yes' if p['perf_analyzer_client_bound'] else 'no'} |" for p in rows]
    return "\n".join(lines + [""])


def command(args) -> str:
    """The command that reproduces the run, with the repository by its name (no machine path in the results)."""
    flags = {"--repository": args.repository.name, "--models": ",".join(args.models),
             "--protocols": ",".join(args.protocols), "--concurrency": ",".join(map(str, args.concurrency)),
             "--rounds": args.rounds, "--window-s": args.window_s}
    return shlex.join(["python", "-m", "bench.served_compare", *(str(x) for kv in flags.items() for x in kv)])


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    binary, why = find_perf_analyzer(args.perf_analyzer)
    if binary is None:
        raise UserError(f"the comparison needs perf_analyzer: {why}")
    mode, _ = choose_server(args.server)
    before = os.getloadavg()
    with TritonServer(args.repository, mode) as server:
        rows = measure_both(args, server, binary)
    result = {"machine": machine_info(), "perf_analyzer": why.split(" (")[0], "server": mode,
              "repository": args.repository.name, "command": command(args),
              "settings": {"rounds": args.rounds, "window_s": args.window_s, "concurrency": args.concurrency,
                           "protocols": args.protocols, "models": args.models},
              "load_average_1_5_15min": {"before": before, "after": os.getloadavg()}, "rows": rows}
    result["pairs"] = pairs(rows)
    write_text(args.out / "comparison.json", json.dumps(result, indent=1))
    write_csv(result["pairs"], args.out / "comparison.csv")
    write_text(args.out / "README.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
