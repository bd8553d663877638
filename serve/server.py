"""Start, watch and stop a Triton server: a tritonserver on PATH, the NGC container, or the bundled one.

The server is started in its own session and stopped by its own pid (SIGTERM, then SIGKILL after a
deadline); readiness is polled with a hard deadline so a server that cannot start never hangs us;
python-backend shared-memory regions are removed by their per-server prefix.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from serve.bundled import backend_directory, bundled_root, gpu_visible, runtime_repository, server_environment
from serve.repository import RepositoryError

SERVERS = ("auto", "local", "docker", "bundled")
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


class ServerError(Exception):
    """The server could not be chosen, started or reached (one line, plus the log tail where there is one)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_server(requested: str) -> tuple[str, str]:
    """(mode, why). auto: a tritonserver on PATH, else a working Docker engine, else the bundled server."""
    if requested not in SERVERS:
        raise ServerError(f"--server must be one of {', '.join(SERVERS)}")
    local, docker, bundled = shutil.which("tritonserver"), None, bundled_root()
    if requested == "local" and not local:
        raise ServerError("--server local: no tritonserver on PATH (run inside the NGC Triton container)")
    if requested == "docker" and not docker_available():
        raise ServerError("--server docker: no working Docker engine (docker info failed)")
    if requested == "bundled" and not bundled:
        raise ServerError("--server bundled: nvidia-pytriton is not installed (pip install nvidia-pytriton)")
    if requested != "auto":
        return requested, "as asked"
    if local:
        return "local", f"tritonserver found at {local} (native onnxruntime/tensorrt backends)"
    docker = docker_available()
    if docker:
        return "docker", f"no tritonserver on PATH; Docker engine available ({DEFAULT_IMAGE})"
    if bundled:
        return "bundled", "no tritonserver on PATH and no Docker engine; using the Triton bundled in nvidia-pytriton " \
                          "(python backend: ONNX models run through onnxruntime)"
    raise ServerError("no Triton found: install nvidia-pytriton, put tritonserver on PATH, or start Docker")


@dataclass
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"


class TritonServer:
    def __init__(self, repository: Path, mode: str = "bundled", host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, ready_timeout: float = 60.0, image: str = DEFAULT_IMAGE,
                 log_file: Path | None = None, verbose: bool = False):
        self.repository = Path(repository).resolve()
        self.mode, self.image, self.ready_timeout, self.verbose = mode, image, ready_timeout, verbose
        self.endpoints = Endpoints(host, http_port or free_port(), grpc_port or free_port(), metrics_port or free_port())
        self.workdir = Path(tempfile.mkdtemp(prefix="expertfuse-triton-"))
        self.log_file = Path(log_file) if log_file else self.workdir / "server.log"
        self.shm_prefix = f"expertfuse_{uuid.uuid4().hex[:8]}_"
        self.notes: list[str] = []
        self.process: subprocess.Popen | None = None
        self.container = f"expertfuse-{uuid.uuid4().hex[:8]}"

    def _args(self, repository: str) -> list[str]:
        e = self.endpoints
        return [f"--model-repository={repository}", f"--http-address={e.host}", f"--http-port={e.http_port}",
                f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}", "--allow-metrics=true",
                f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}", "--disable-auto-complete-config",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}", "--exit-timeout-secs=5",
                f"--log-verbose={1 if self.verbose else 0}"]

    def command(self) -> tuple[list[str], dict[str, str]]:
        if self.mode == "bundled":
            root = bundled_root()
            runtime = self.workdir / "repository"
            runtime.mkdir()
            try:
                self.notes = runtime_repository(self.repository, runtime)
                backends = backend_directory(root, self.workdir / "backends")
            except RepositoryError as exc:
                raise ServerError(str(exc)) from None
            return ([str(root / "bin" / "tritonserver"), *self._args(str(runtime)), f"--backend-directory={backends}",
                     "--pinned-memory-pool-byte-size=0", f"--log-file={self.log_file}"], server_environment())
        if self.mode == "local":
            return ["tritonserver", *self._args(str(self.repository)), f"--log-file={self.log_file}"], dict(os.environ)
        e = self.endpoints
        ports = [f"-p{e.client_host}:{p}:{p}" for p in (e.http_port, e.grpc_port, e.metrics_port)]
        args = [a.replace(e.host, "0.0.0.0") if a.startswith(("--http-address", "--grpc-address", "--metrics-address"))
                else a for a in self._args("/models")]
        gpus = ["--gpus=all"] if gpu_visible() else []  # Docker refuses --gpus on a host without NVIDIA's runtime
        return (["docker", "run", "--rm", "--name", self.container, *gpus, "--shm-size=1g", *ports,
                 "-v", f"{self.repository}:/models:ro", self.image, "tritonserver", *args], dict(os.environ))

    def start(self) -> "TritonServer":
        try:
            command, env = self.command()
        except ServerError:
            self.cleanup()
            raise
        with open(self.log_file, "ab") as log:  # what the server prints outside its --log-file lands here too
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"Triton exited with code {self.process.returncode} before it was ready")
            if self.ready():
                return self
            time.sleep(0.05)
        self._fail(f"Triton was not ready within {self.ready_timeout:.0f} s")

    def _fail(self, reason: str) -> None:
        tail = self.log_tail()
        self.stop()
        self.cleanup()
        raise ServerError(f"{reason}; server log:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(text[-lines:]) or "(empty server log)"

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.mode == "docker":
                subprocess.run(["docker", "stop", "-t", "5", self.container], capture_output=True)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove the temporary runtime repository and log (after stop())."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()
