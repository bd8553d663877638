"""python -m serve: serve every model in model_repository/ through Triton over HTTP and gRPC.

  python -m serve [--repository|--model-repository model_repository] [--server auto|local|docker|bundled]
      [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
  python -m serve --emit compose|k8s|kserve --repository model_repository [--gpus N] [--replicas N]
      [--max-replicas N] [--repository-uri s3://...|gs://...|pvc://...] [--out deploy]

Runs until Ctrl-C or SIGTERM (honoured at any moment, start-up included), then stops the server and
removes what it created.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import tritonclient.http as httpclient

from expertfuse.cli import positive_float, run_cli
from serve.deploy import emit_manifests
from serve.server import DEFAULT_IMAGE, SERVERS, ServerError, StartCancelled, TritonServer, choose_server, describe_exit


def describe_models(url: str) -> list[str]:
    """'name vN  image UINT8 [-1,32,32,3] -> logits FP32 [-1,10]' for every READY model."""
    client = httpclient.InferenceServerClient(url)
    try:
        lines = []
        for entry in client.get_model_repository_index():
            if entry.get("state") != "READY":
                lines.append(f"{entry['name']}: {entry.get('state', 'UNKNOWN')} {entry.get('reason', '')}".rstrip())
                continue
            meta = client.get_model_metadata(entry["name"])
            sig = lambda ts: ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in ts)  # noqa: E731
            lines.append(f"{entry['name']} v{entry.get('version', '?')} READY  {sig(meta['inputs'])} -> {sig(meta['outputs'])}")
        return lines
    except httpclient.InferenceServerException as exc:
        raise ServerError(f"Triton stopped answering right after start ({exc.message()[:160]}); restart python -m serve") \
            from None
    finally:
        client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", "--model-repository", dest="repository", type=Path,
                   default=Path("model_repository"), help="model repository (Triton's --model-repository)")
    p.add_argument("--server", default="auto", choices=SERVERS)
    p.add_argument("--host", default="127.0.0.1", help="listen address [127.0.0.1]")
    p.add_argument("--http-port", type=int, default=8000, help="0 picks a free port [8000]")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port [8001]")
    p.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port [8002]")
    p.add_argument("--ready-timeout", type=positive_float, default=120.0, help="seconds to wait for readiness [120]")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"NGC image for --server docker and --emit; --emit kserve "
                   f"takes its tag as runtimeVersion [{DEFAULT_IMAGE}]")
    p.add_argument("--log-file", type=Path, help="keep the server log here (default: a temporary file, removed)")
    p.add_argument("--emit", choices=["compose", "k8s", "kserve"], help="write deployment manifests for the NGC "
                   "container (Docker Compose), a cluster (Kubernetes) or KServe's Triton runtime instead of serving")
    p.add_argument("--gpus", type=int, default=0, help="--emit: GPUs per Triton replica [0]")
    p.add_argument("--replicas", type=int, default=1,
                   help="--emit: Triton replicas (k8s, kserve: the autoscaler's minimum) [1]")
    p.add_argument("--max-replicas", type=int,
                   help="--emit k8s, kserve: the autoscaler's maximum, >= --replicas [4 x replicas]")
    p.add_argument("--repository-uri", help="--emit: read the repository (a copy of --repository) from this URI "
                   "instead of a mounted volume: s3://, gs:// or as:// (Triton), s3://, gs:// or pvc:// (kserve, "
                   "required)")
    p.add_argument("--out", type=Path, default=Path("deploy"), help="--emit: folder for the manifests [deploy]")
    return p.parse_args(argv)


def stop_on_signals() -> tuple[threading.Event, list[str]]:
    """Ctrl-C and SIGTERM set an event that every wait of the launcher watches."""
    stop, received = threading.Event(), []

    def on_signal(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop, received


def serve_until_stopped(server: TritonServer, stop: threading.Event) -> None:
    for note in server.notes:
        print(f"note: {note}")
    e = server.endpoints
    print(f"HTTP  http://{e.http}\ngRPC  {e.grpc}\nmetrics http://{e.client_host}:{e.metrics_port}/metrics")
    for line in describe_models(e.http):
        print(f"  {line}")
    print("serving; Ctrl-C or SIGTERM to stop", flush=True)
    while not stop.wait(0.2):
        code = server.process.poll()
        if code is not None:
            raise ServerError(f"Triton {describe_exit(code)} while serving ({server.failure_reason()}); "
                              "restart python -m serve")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.emit:
        emit_manifests(a)
        return
    stop, received = stop_on_signals()
    mode, why = choose_server(a.server)
    print(f"server: {mode} ({why})", flush=True)
    server = TritonServer(a.repository, mode, a.host, a.http_port, a.grpc_port, a.metrics_port, a.ready_timeout,
                          a.image, a.log_file, stop_requested=stop)
    try:
        server.start()
    except StartCancelled:
        print(f"stopped by {received[0]} before Triton was ready", flush=True)
        return
    try:
        serve_until_stopped(server, stop)
        print(f"stopping ({received[0]})", flush=True)
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    sys.exit(run_cli(main))
