"""python -m bench: what does the ensemble cost compared with one expert, and what does fusion buy?

  python -m bench --ckpt runs/ncl/ncl.pt [--runtimes torch-cpu,onnxruntime-cpu] [--batches 1,8,64]
      [--served --repository model_repository | --http-url H:P --grpc-url H:P] [--concurrency 1,8]
      [--protocols http,grpc] [--load-generator python|perf_analyzer] [--out bench/results/latest]

In-process: single expert, ensemble `loop` and ensemble `grouped` on every runtime (parity-checked
first), batch sweep with windows repeated until three agree. Served: the fused model, one expert
and the naive Triton ensemble (as written by `python -m export.onnx` and `--naive-ensemble`), over
HTTP and gRPC, at each concurrency. Writes bench.json, inprocess.csv, served.csv, summary.md and plots.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.inprocess import available_runtimes, check_parity, parity_images, run_inprocess
from bench.machine import machine_info
from bench.report import headline, markdown, write_all
from bench.runners import TritonRunner
from bench.served import find_perf_analyzer, measure_concurrency, run_perf_analyzer
from expertfuse.cli import int_list
from serve.server import ServerError, TritonServer, choose_server
from train.checkpoint import load_model
from expertfuse.cli import run_cli
from expertfuse.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="training checkpoint")
    p.add_argument("--runtimes", help=f"comma-separated (default: all available here: {','.join(available_runtimes())})")
    p.add_argument("--batches", type=int_list, default=[1, 8, 64], help="in-process batch sizes [1,8,64]")
    p.add_argument("--window-s", type=float, default=1.0, help="length of one timed window [1.0]")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process sweep")
    p.add_argument("--served", action="store_true", help="also measure through Triton")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="start a Triton on this repository (unless --http-url/--grpc-url are given)")
    p.add_argument("--server", default="auto", help="which Triton to start: auto|local|docker|bundled [auto]")
    p.add_argument("--http-url", help="a running Triton's HTTP endpoint host:port")
    p.add_argument("--grpc-url", help="a running Triton's gRPC endpoint host:port")
    p.add_argument("--model", help="served fused model name (default: the checkpoint's method, e.g. ncl)")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--concurrency", type=int_list, default=[1, 8], help="served concurrency levels [1,8]")
    p.add_argument("--served-batch", type=int, default=1, help="images per served request [1]")
    p.add_argument("--load-generator", default="python", choices=["python", "perf_analyzer"])
    p.add_argument("--client-processes", type=int, default=4, help="most client processes generating load [4]")
    p.add_argument("--client", default="threads", choices=["threads", "asyncio"],
                   help="inside each load process: threads with sync clients, or tritonclient asyncio coroutines")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    return p


def served_roles(fused: str) -> dict[str, str]:
    return {"fused": fused, "single": f"{fused}_expert0", "naive": f"{fused}_naive"}


def served_parity(url: str, protocol: str, name: str, network, images: np.ndarray) -> dict:
    """The served model against the checkpoint's PyTorch reference, before it is timed: the experts and the
    precision its config records (export writes them; a naive ensemble, which has none, averages them all)."""
    runner = TritonRunner(url, protocol, name)
    try:
        params = runner.parameters()
        experts = tuple(int(e) for e in params.get("expertfuse_experts", "").split(",") if e) \
            or tuple(range(network.num_experts))
        return check_parity(runner, network, experts, images, fp16=params.get("expertfuse_precision") == "fp16")
    finally:
        runner.close()


def run_served(args, fused: str, network, log=print) -> list[dict]:
    """Parity-check, then time the fused model, one expert and the naive ensemble over each protocol."""
    import tritonclient.http as httpclient
    perf_analyzer = find_perf_analyzer() if args.load_generator == "perf_analyzer" else None
    if args.load_generator == "perf_analyzer" and not perf_analyzer:
        raise UserError("--load-generator perf_analyzer: no working perf_analyzer binary on PATH (pip's perf-analyzer "
                        "0.1.0 is an empty placeholder; use the Triton SDK container)")
    server = None
    if not (args.http_url and args.grpc_url):
        mode, why = choose_server(args.server)
        log(f"starting Triton: {mode} ({why})")
        server = TritonServer(args.repository, mode).start()
        args.http_url, args.grpc_url = server.endpoints.http, server.endpoints.grpc
    rows, workdir = [], None
    image_size = network.spec.input_size
    images = parity_images(image_size, 16)  # 16: FP16 models may miss one top-1 and still pass
    try:
        client = httpclient.InferenceServerClient(args.http_url)
        ready = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
        client.close()
        workdir = Path(tempfile.mkdtemp(prefix="expertfuse-bench-")) if perf_analyzer else None  # its CSV files
        for role, model in served_roles(fused).items():
            if model not in ready:
                log(f"  {role}: model {model!r} is not served; skipped")
                continue
            for protocol in args.protocols.split(","):
                url = args.http_url if protocol == "http" else args.grpc_url
                parity = served_parity(url, protocol, model, network, images)
                checked = {"model": model, "protocol": protocol, "model_role": role,
                           "parity_max_abs_diff": parity["max_abs_diff"], "parity_top1_agreement": parity["top1_agreement"]}
                if not parity["ok"]:
                    log(f"  {role:>6} {model:<16} {protocol:<4} REFUSED: does not compute what {args.ckpt} does "
                        f"(max|diff| {parity['max_abs_diff']:.2e}, top-1 {100 * parity['top1_agreement']:.1f}%)")
                    rows.append({**checked, "refused": "parity"})
                    continue
                if perf_analyzer:
                    points = run_perf_analyzer(perf_analyzer, url, protocol, model, args.served_batch, args.concurrency,
                                               args.window_s, workdir)
                else:
                    points = [measure_concurrency(url, protocol, model, image_size, args.served_batch, c, args.window_s,
                                                  max_processes=args.client_processes, client_kind=args.client)
                              for c in args.concurrency]
                for row in points:
                    row.update(checked)
                    rows.append(row)
                    log(f"  {role:>6} {model:<16} {protocol:<4} c={row['concurrency']:<3} {row['throughput']:8.1f} img/s  "
                        f"p50 {row.get('p50_ms', float('nan')):7.2f} ms  p99 {row.get('p99_ms', float('nan')):7.2f} ms"
                        f"{'  exec/req %.2f' % row['server_exec_per_request'] if 'server_exec_per_request' in row else ''}"
                        f"{'  (client-bound)' if row.get('client_bound') else ''}")
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    network, ckpt = load_model(args.ckpt)
    runtimes = args.runtimes.split(",") if args.runtimes else available_runtimes()
    unknown = set(runtimes) - set(available_runtimes())
    if unknown:
        raise UserError(f"runtime(s) not available here: {', '.join(sorted(unknown))} (available: {', '.join(available_runtimes())})")
    result = {"checkpoint": str(args.ckpt), "machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
              "inprocess": [], "served": []}
    with tempfile.TemporaryDirectory(prefix="expertfuse-bench-") as tmp:
        if not args.no_inprocess:
            print(f"in-process: {', '.join(runtimes)}; batches {args.batches}")
            result["inprocess"] = run_inprocess(args.ckpt, runtimes, args.batches, args.window_s, Path(tmp))
    if args.served:
        print(f"served: concurrency {args.concurrency}, batch {args.served_batch}, {args.protocols}")
        try:
            result["served"] = run_served(args, args.model or ckpt["method"], network)
        except ServerError as exc:
            raise UserError(str(exc)) from None
    result["headline"] = headline(result["inprocess"], result["served"])
    files = write_all(result, args.out)
    print()
    print(markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
