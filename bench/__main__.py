"""python -m bench: what the ensemble buys (accuracy) next to what it costs (latency), measured side by side.

  python -m bench --ckpt runs/ncl/ncl.pt [--runtimes onnxruntime-cpu,torch-cpu] [--batches 1,8,64]
      [--served --repository model_repository | --http-url H:P --grpc-url H:P] [--concurrency 1,2,4,8,16]
      [--protocols http,grpc] [--p99-budget-ms MS] [--dataset ... --data-root ...] [--out bench/results/latest]

Every variant (each expert, the best-k subsets, the fused ensemble loop/grouped, FP16, INT8 and early-exit
models of the repository, and each served model over HTTP and gRPC) is checked against the checkpoint's PyTorch
ensemble and scored on a labelled set (default: the checkpoint's own evaluation split) through the
served input path; the compared variants are then timed in one interleaved run, so every ratio comes
with its 95% interval. A variant the repository already holds, exported from this very checkpoint (same SHA-256),
is gated and timed as that file rather than exported again. Writes bench.json, cost_accuracy.csv, inprocess.csv, served.csv, summary.md, plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.measure.served import PERF_ANALYZER_ENV, default_client_processes
from expertfuse.cli import choice_list, name_list, positive_float, positive_int, positive_int_list, run_cli
from export.data_flags import add_data_args
from serve.protocols import PROTOCOLS
from serve.server import SERVERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="training checkpoint")
    p.add_argument("--runtimes", type=name_list,
                   help="comma-separated (default: every one available here: torch-cpu,onnxruntime-cpu, plus the CUDA "
                        "and TensorRT ones where a GPU and their libraries are)")
    p.add_argument("--batches", type=positive_int_list, default=[1, 8, 64],
                   help="in-process batch sizes [1,8,64]")
    p.add_argument("--budget-s", type=positive_float, default=8.0, help="seconds of interleaved timing per batch size [8]")
    p.add_argument("--window-s", type=positive_float, default=1.0, help="length of one served measurement window [1.0]")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process variants")
    p.add_argument("--served", action="store_true", help="also measure through Triton")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="model repository: its INT8 and early-exit models are benched too, and its exports of this very "
                        "checkpoint are timed as they are instead of exported again; Triton is started on it "
                        "unless --http-url/--grpc-url are given")
    p.add_argument("--server", default="auto", choices=SERVERS, help="which Triton to start [auto]")
    p.add_argument("--http-url", help="a running Triton's HTTP endpoint host:port")
    p.add_argument("--grpc-url", help="a running Triton's gRPC endpoint host:port")
    p.add_argument("--model", help="served fused model name (default: the checkpoint's method, e.g. ncl)")
    p.add_argument("--protocols", type=choice_list(PROTOCOLS),
                   help="served protocols measured [http,grpc; with only --http-url or --grpc-url: that one]")
    p.add_argument("--concurrency", "--concurrency-range", type=positive_int_list, default=[1, 2, 4, 8, 16],
                   help="served concurrency levels, each one measured [1,2,4,8,16]")
    p.add_argument("--served-batch", type=positive_int, default=1, help="images per served request [1]")
    p.add_argument("--shared-memory", action="store_true",
                   help="the interleaved served timing passes tensors through system shared memory, as perf_analyzer "
                        "--shared-memory system: no serialization in the served / in-process ratio (Triton on this host)")
    p.add_argument("--load-generator", default="auto", choices=["auto", "python", "perf_analyzer"],
                   help="the sweep's load: perf_analyzer, our Python generator, or auto: perf_analyzer wherever a "
                        "working binary is found, else Python [auto]")
    p.add_argument("--perf-analyzer", metavar="PATH", help=f"the perf_analyzer binary [${PERF_ANALYZER_ENV}, else PATH]")
    p.add_argument("--client-processes", type=positive_int,
                   help=f"most Python load processes [half the cores: {default_client_processes()}]")
    p.add_argument("--client", default="asyncio", choices=["asyncio", "threads"],
                   help="inside each Python load process: asyncio coroutines with one connection each, or threads "
                        "with sync clients [asyncio]")
    p.add_argument("--p99-budget-ms", type=positive_float,
                   help="served p99 latency budget: drawn on the latency-throughput plot, and the summary names the "
                        "highest throughput within it per model and protocol")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    add_data_args(p)
    return p

def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # torch, the runtimes and the checkpoint only once the flags parse: a typo is refused at once, and the load
    # generator's spawned processes, which re-import this module, start without them
    from bench.pipeline import run_bench
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
