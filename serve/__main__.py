"""python -m serve: serve every model in model_repository/ through Triton over HTTP and gRPC.

  python -m serve [--repository model_repository] [--server auto|local|docker|bundled]
      [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
  python -m serve --emit compose|k8s --repository model_repository [--gpus N] [--replicas N]
      [--max-replicas N] [--repository-uri s3://...] [--out deploy]

Runs until Ctrl-C or SIGTERM, then stops the server and removes what it created.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import tritonclient.http as httpclient

from serve.deploy import emit_cli
from serve.server import DEFAULT_IMAGE, SERVERS, ServerError, TritonServer, choose_server


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
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--server", default="auto", choices=SERVERS)
    p.add_argument("--host", default="127.0.0.1", help="listen address [127.0.0.1]")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness [120]")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"NGC image for --server docker [{DEFAULT_IMAGE}]")
    p.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    p.add_argument("--emit", choices=["compose", "k8s"], help="write deployment manifests for the NGC container "
                   "(Docker Compose) or a cluster (Kubernetes) instead of serving")
    p.add_argument("--gpus", type=int, default=0, help="--emit: GPUs per Triton replica [0]")
    p.add_argument("--replicas", type=int, default=1, help="--emit: Triton replicas (k8s: the autoscaler's minimum) [1]")
    p.add_argument("--max-replicas", type=int, default=0, help="--emit k8s: the autoscaler's maximum [4 x replicas]")
    p.add_argument("--repository-uri", help="--emit: Triton reads the repository from this s3://, gs:// or as:// URI "
                   "(a copy of --repository) instead of a mounted volume")
    p.add_argument("--out", type=Path, default=Path("deploy"), help="--emit: folder for the manifests [deploy]")
    a = p.parse_args(argv)
    if a.emit:
        return emit_cli(a)
    try:
        mode, why = choose_server(a.server)
        print(f"server: {mode} ({why})", flush=True)
        server = TritonServer(a.repository, mode, a.host, a.http_port, a.grpc_port, a.metrics_port, a.ready_timeout,
                              a.image, a.log_file)
        stop = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
        server.start()
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for note in server.notes:
            print(f"note: {note}")
        e = server.endpoints
        print(f"HTTP  http://{e.http}\ngRPC  {e.grpc}\nmetrics http://{e.client_host}:{e.metrics_port}/metrics")
        for line in describe_models(e.http):
            print(f"  {line}")
        print("serving; Ctrl-C or SIGTERM to stop", flush=True)
        while not stop:
            if server.process is None or server.process.poll() is not None:
                print(f"error: Triton stopped unexpectedly; server log:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("stopping", flush=True)
        return 0
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
