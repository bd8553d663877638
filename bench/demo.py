"""python -m bench.demo: the whole product on the embedded synthetic data, with the real CLIs in sequence (each run
as its `python -m` command runs it, in this process; the server in its own).

  train NCL (3 x ResNet-8, 24 CPU epochs) -> export ONNX (fused ensemble, and every expert alone
  plus the naive Triton ensemble) -> start Triton -> classify images over HTTP and gRPC -> bench single
  vs ensemble in-process and served -> summary and plots -> stop the server.

Every step prints what it runs; a failing step stops the pipeline with its reason.
`--quick` is the reduced form the test suite runs (1 epoch, tiny data, the grouped fusion, short windows).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from PIL import Image

from bench.measure.evaluation import collapsed
from serve.server import free_ports
from train.config import config_from_args
from train.data.synthetic import synthesize


class StepFailed(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def step(title: str, *args: str) -> None:
    print(f"\n== {title}\n$ python -m {shlex.join(args)}", flush=True)
    started = time.monotonic()
    code = run_as_main(*args)
    if code != 0:
        raise StepFailed(f"{title}: python -m {args[0]} exited with code {code}", code)
    print(f"-- {title}: done in {time.monotonic() - started:.0f} s", flush=True)


def run_as_main(module: str, *args: str) -> int:
    """`python -m module args` run in this process, as that command runs it (the module as __main__ with that
    command line; processes it spawns start from it): its exit code. One process for the steps pays torch's
    start-up and the exporter's first-use costs once instead of once per step (seconds each). The signal handlers
    a step installs (Ctrl-C, SIGTERM) end with it."""
    saved = sys.argv, {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        return 1
    except Exception:  # a bug in the step: its traceback, as its own process would print it
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved[0]
        for sig, handler in saved[1].items():
            signal.signal(sig, handler)
    return 0


def start_server(repository: Path, http_port: int, grpc_port: int, metrics_port: int) -> subprocess.Popen:
    args = ["serve", "--repository", str(repository), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port)]
    print(f"\n== start Triton\n$ python -m {shlex.join(args)} &", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        print(f"   {line}", end="", flush=True)
        if line.startswith("serving"):
            return proc
    raise StepFailed(f"start Triton: python -m serve exited with code {proc.wait()}: {proc.stderr.read().strip()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("\n== Triton stopped", flush=True)


def write_images(folder: Path, count: int, size: int, classes: int) -> list[Path]:
    """A few held-out synthetic images (of the trained classes) as PNG files, the way a user would have them on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthesize([1] * classes, seed=424242, image_size=size)
    paths = []
    for i in range(min(count, classes)):
        paths.append(folder / f"pattern{labels[i]}_{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    return paths


def training_check(result: dict) -> list[str]:
    """What the method should produce: every expert learning (none collapsed onto a few classes) and the ensemble
    at least as accurate as its best expert. Returns the problems found."""
    rows = {r["variant"]: r["accuracy"] for r in result["inprocess"]
            if "accuracy" in r and r["runtime"] == "onnxruntime-cpu"}
    problems = [f"{name} collapsed: right on {sum(a > 0 for a in acc['per_class'])} of {len(acc['per_class'])} classes"
                for name, acc in rows.items() if name.startswith("expert") and collapsed(acc)]
    best = max((acc["overall"] for name, acc in rows.items() if name.startswith("expert")), default=None)
    ensemble = rows.get("ensemble-loop", {}).get("overall")
    if best is not None and ensemble is not None and ensemble < best:
        ci = ((result.get("decision") or {}).get("gain_ci95") or {}).get("overall")
        noise = f" (the gain's 95% interval over the evaluation images: [{ci[0]:+.1f}, {ci[1]:+.1f}])" if ci else ""
        problems.append(f"the ensemble ({ensemble:.1f}%) is less accurate than its best expert ({best:.1f}%){noise}")
    return problems


def print_decision(bench_out: Path) -> None:
    """End with what a user decides from: the decision sentence and the cost-accuracy table."""
    summary = (bench_out / "summary.md").read_text().splitlines()
    start = summary.index("## Cost and accuracy") if "## Cost and accuracy" in summary else len(summary)
    end = next((i for i in range(start + 1, len(summary)) if summary[i].startswith("## ")), len(summary))
    print("\n== what the ensemble buys, and what it costs\n" + "\n".join([summary[2], ""] + summary[start:end]),
          flush=True)
    problems = training_check(json.loads((bench_out / "bench.json").read_text()))
    print("training check: " + ("; ".join(problems) if problems else
                                "every expert learned and the ensemble is at least as accurate as its best expert"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes [runs/demo]")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's 24; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="reduced form: 1 epoch, tiny data, short measurements")
    p.add_argument("--bench-out", type=Path, help="bench results folder [<out>/bench]")
    a = p.parse_args(argv)
    out = a.out
    ckpt, repo, bench_out = out / "train" / "ncl.pt", out / "model_repository", a.bench_out or out / "bench"
    train_args = ["train", "--preset", "ncl-synthetic", "--out", str(out / "train")]
    # Shorter than `python -m bench`'s defaults (batches 1,8,64, 8 s per batch, concurrency 1..16) so that the
    # whole demo stays under 10 minutes on 2 cores; the full bench keeps its defaults.
    bench_args = ["--batches", "1,64", "--budget-s", "4", "--window-s", "0.5", "--concurrency", "1,4,16",
                  "--client-processes", "2"]
    fusion = []  # auto: both fusions exported and timed, the faster served
    if a.quick:
        # The test suite's run: the fusion named (auto costs a second export and seconds of timing) and one
        # concurrency in the served sweep; every step still runs, on both runtimes and both protocols.
        train_args += ["--synthetic-max", "50", "--imb-factor", "10", "--synthetic-test", "10",
                       "--epochs", str(a.epochs or 1)]
        bench_args = ["--batches", "1,4", "--budget-s", "1", "--window-s", "0.2", "--concurrency", "1",
                      "--client-processes", "1", "--eval-limit", "40"]
        fusion = ["--fusion", "grouped"]
    elif a.epochs:
        train_args += ["--epochs", str(a.epochs)]
    started = time.monotonic()
    server = None
    try:
        step("train NCL on the synthetic long-tailed data", *train_args)
        export = ["--ckpt", str(ckpt), "--out", str(repo), "--overwrite", "--max-batch", "64"]
        step("export the fused ensemble to ONNX", "export.onnx", *export, *fusion)
        step("export each expert alone + the naive Triton ensemble", "export.onnx", *export, "--naive-ensemble")
        http_port, grpc_port, metrics_port = free_ports(3)
        server = start_server(repo, http_port, grpc_port, metrics_port)
        images = write_images(out / "images", 4, 32, config_from_args(train_args[1:]).synthetic_classes)
        step("classify images over HTTP", "serve.client", "--url", f"127.0.0.1:{http_port}", "--model", "ncl",
             "--topk", "1", *map(str, images))
        step("classify images over gRPC", "serve.client", "--url", f"127.0.0.1:{grpc_port}", "--protocol", "grpc",
             "--model", "ncl", "--topk", "1", *map(str, images))
        step("bench every variant's accuracy and cost, in-process and served", "bench", "--ckpt", str(ckpt), "--served",
             "--http-url", f"127.0.0.1:{http_port}", "--grpc-url", f"127.0.0.1:{grpc_port}", "--repository", str(repo),
             "--runtimes", "torch-cpu,onnxruntime-cpu", "--out", str(bench_out), *bench_args)
    except StepFailed as exc:
        print(f"\ndemo stopped: {exc}", file=sys.stderr)
        return exc.code  # the step's own: 2 for a refused input, 130 / 143 for Ctrl-C / SIGTERM
    finally:
        if server is not None:
            stop_server(server)
    print_decision(bench_out)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s: checkpoint {ckpt}, repository {repo}/, "
          f"summary {bench_out / 'summary.md'}, plots {bench_out}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
