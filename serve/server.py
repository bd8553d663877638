"""Start, watch and stop a Triton server: a tritonserver on PATH, the NGC container, or the bundled one.

The server is started in its own session (process group) tied to the launcher's life (serve.lifetime)
and stopped by its own pid (SIGTERM, then SIGKILL to its group after a grace period). Ports are
checked free first and readiness is polled on our own live process with a hard deadline and a stop
event, so a server that cannot start never hangs us and Ctrl-C works at any moment. Failures say
which model failed and why, from the server's log. python-backend shared-memory regions are removed
by their per-server prefix.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from serve.bundled import backend_directory, bundled_root, gpu_visible, runtime_repository, server_environment
from expertfuse.errors import UserError
from serve.lifetime import RUN_PREFIX, clean_stale_runs, die_with_launcher, remove_shm, write_record
from serve.repository import finish_publish, model_folders

SERVERS = ("auto", "local", "docker", "bundled")
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


class ServerError(UserError):
    """The server could not be chosen, started or kept running (one line; exit code 1)."""

    exit_code = 1


class StartCancelled(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) while the server was starting; it has been stopped."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free now. All are bound at once: ports asked for one after another can come back equal
    (the kernel may hand out a just-closed port again), and Triton refuses an HTTP, gRPC or metrics port twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tritonserver_args(repository: str, http_port: int, grpc_port: int, metrics_port: int,
                      exit_timeout_s: int) -> list[str]:
    """The flags of every Triton we start or deploy: the repository, the three ports with metrics on, our configs
    as written (no auto-complete), and how long a stop lets in-flight requests finish."""
    return [f"--model-repository={repository}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            "--allow-metrics=true", f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
            f"--exit-timeout-secs={exit_timeout_s}"]


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
                 log_file: Path | None = None, verbose: bool = False, stop_requested: threading.Event | None = None):
        self.repository = Path(repository).resolve()
        self.mode, self.image, self.ready_timeout, self.verbose = mode, image, ready_timeout, verbose
        self.stop_requested = stop_requested or threading.Event()
        spare = iter(free_ports(3, host))
        self.endpoints = Endpoints(host, http_port or next(spare), grpc_port or next(spare), metrics_port or next(spare))
        clean_stale_runs()
        self.workdir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX))
        self.log_file = Path(log_file) if log_file else self.workdir / "server.log"
        self.shm_prefix = f"expertfuse_{uuid.uuid4().hex[:8]}_"
        write_record(self.workdir, self.shm_prefix)
        self.notes: list[str] = []
        self.process: subprocess.Popen | None = None
        self.container = f"expertfuse-{uuid.uuid4().hex[:8]}"

    def _args(self, repository: str) -> list[str]:
        e = self.endpoints
        return [*tritonserver_args(repository, e.http_port, e.grpc_port, e.metrics_port, exit_timeout_s=5),
                f"--http-address={e.host}", f"--grpc-address={e.host}", f"--metrics-address={e.host}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--log-verbose={1 if self.verbose else 0}"]

    def command(self) -> tuple[list[str], dict[str, str]]:
        finish_publish(self.repository)  # an export killed mid-publish: serve its whole set, never part of it
        if self.mode == "bundled":
            root = bundled_root()
            runtime = self.workdir / "repository"
            runtime.mkdir()
            self.notes = runtime_repository(self.repository, runtime)
            backends = backend_directory(root, self.workdir / "backends")
            return ([str(root / "bin" / "tritonserver"), *self._args(str(runtime)), f"--backend-directory={backends}",
                     "--pinned-memory-pool-byte-size=0", f"--log-file={self.log_file}"], server_environment())
        model_folders(self.repository)  # the bundled path checks these while mirroring the repository
        if self.mode == "local":
            return ["tritonserver", *self._args(str(self.repository)), f"--log-file={self.log_file}"], dict(os.environ)
        e = self.endpoints
        ports = [f"-p{e.client_host}:{p}:{p}" for p in (e.http_port, e.grpc_port, e.metrics_port)]
        args = [a.replace(e.host, "0.0.0.0") if a.startswith(("--http-address", "--grpc-address", "--metrics-address"))
                else a for a in self._args("/models")]
        gpus = ["--gpus=all"] if gpu_visible() else []  # Docker refuses --gpus on a host without NVIDIA's runtime
        return (["docker", "run", "--rm", "--name", self.container, *gpus, "--shm-size=1g", *ports,
                 "-v", f"{self.repository}:/models:ro", self.image, "tritonserver", *args], dict(os.environ))

    def check_ports(self) -> None:
        """Refuse ports another process listens on: its readiness answer would pass for ours."""
        e = self.endpoints
        flags = {"--http-port": e.http_port, "--grpc-port": e.grpc_port, "--metrics-port": e.metrics_port}
        if len(set(flags.values())) < len(flags):
            raise ServerError(f"{', '.join(f'{k} {v}' for k, v in flags.items())}: the three ports must differ")
        host = e.client_host if self.mode == "docker" else (e.host or "0.0.0.0")
        for flag, port in flags.items():
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
                try:
                    s.bind((host, port))
                except OSError as exc:
                    raise ServerError(f"port {port} on {host} is not free ({exc.strerror}): stop the server holding it "
                                      f"or choose another {flag} (0 picks a free one)") from None

    def start(self) -> "TritonServer":
        """Start and wait until ready. ServerError (everything removed) if it cannot; StartCancelled
        (everything stopped and removed) when stop_requested is set meanwhile."""
        try:
            self.check_ports()
            command, env = self.command()
            with open(self.log_file, "ab") as log:  # what the server prints outside its --log-file lands here too
                self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=die_with_launcher())
            write_record(self.workdir, self.shm_prefix, self.process.pid)
            self._wait_ready()
        except BaseException:
            self.stop(grace=3.0)
            self.cleanup()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not self.stop_requested.is_set():
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"Triton {describe_exit(code)} before it was ready: {self.failure_reason()}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise ServerError(f"Triton was not ready within {self.ready_timeout:.0f} s: {self.failure_reason()}")
            self.stop_requested.wait(0.05)
        raise StartCancelled("stop requested while Triton was starting")

    def ready(self) -> bool:
        """Our server (its process alive, so not another one on the port) answers ready."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http}/v2/health/ready", timeout=1) as r:
                return r.status == 200 and self.process.poll() is None
        except (urllib.error.URLError, OSError):
            return False

    def failure_reason(self) -> str:
        """Why the server failed, in one line: the models it could not load, or its last error line."""
        log = self.log_text().replace(str(self.workdir / "repository"), str(self.repository))  # the mirror's paths
        failed = load_failures(log)
        hint = f"; fix or re-export the model, or move it out of {self.repository}" if failed else ""
        if self.log_file.parent == self.workdir:
            hint += " (--log-file FILE keeps the whole server log)"
        return f"{failed or last_error(log)}{hint}"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then after `grace` seconds SIGKILL to the server's process group (its stubs too)."""
        if self.process is not None:
            if self.process.poll() is None:
                if self.mode == "docker":
                    subprocess.run(["docker", "stop", "-t", "5", self.container], capture_output=True)
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
        self.process = None
        remove_shm(self.shm_prefix)

    def cleanup(self) -> None:
        """Remove the temporary runtime repository, log and launcher record (after stop())."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


def describe_exit(code: int) -> str:
    """'exited with code 1' | 'was killed by signal SIGKILL' (Popen's negative return codes)."""
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# A version that failed to load, and a model refused before any version loads (its config, its version folders).
_LOAD_FAILURE = re.compile(r"failed to load '(?P<name>[^']+)' version (?P<version>\d+): (?P<reason>.*)")
_MODEL_FAILURE = re.compile(r"(?:Poll failed for model directory|failed to load model) '(?P<name>[^']+)': (?P<reason>.*)")
_NOISE = ("CudaDriverHelper", "CUDA driver version", "cudaGetDeviceCount")


def load_failures(log: str) -> str:
    """'model 'x' version 1 failed to load: <Triton's first line of reason>; ...' from a server log."""
    failures = {}
    for pattern in (_LOAD_FAILURE, _MODEL_FAILURE):
        for match in pattern.finditer(log):
            version = f" version {match['version']}" if "version" in pattern.groupindex else ""
            failures[f"model {match['name']!r}{version}"] = match["reason"].split("\\n")[0].rstrip('"').strip()
    return "; ".join(f"{model} failed to load: {reason}" for model, reason in failures.items())


def last_error(log: str) -> str:
    """The server's last error line (Triton's 'E' severity or 'error:'), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip() and not any(n in line for n in _NOISE)]
    errors = [line for line in lines if line.startswith("E") or line.lower().startswith("error")]
    text = (errors or lines or ["the server log is empty"])[-1]
    return text.split("] ", 1)[-1].strip('"')[:300]
