"""python -m serve under faults (issue 12, serve items): each case against the real bundled Triton on
127.0.0.1, and each checks that no process, /dev/shm region or temporary folder is left behind."""
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from serve.lifetime import RECORD, RUN_PREFIX, clean_stale_runs
from serve.repository import ServingOptions, TensorSpec, model_config, write_config
from tests.helpers import REPO

PORTS = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]


class Launcher:
    """`python -m serve` as a user runs it, with its stdout read line by line without blocking the test."""

    def __init__(self, repository: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--server",
                                      "bundled", *PORTS, *extra], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def finish(self, timeout: float = 120) -> tuple[str, str]:
        """Wait for the launcher to exit: (stdout, stderr)."""
        self.proc.wait(timeout)
        time.sleep(0.1)
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return "".join(out), self.proc.stderr.read()

    def wait_for(self, prefix: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.5).startswith(prefix):
                    return
            except queue.Empty:
                assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}"
        raise AssertionError(f"no line starting {prefix!r} within {timeout} s")

    def record(self, timeout: float = 30) -> tuple[Path, dict]:
        """This launcher's run folder and record, once the server is started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run_dir, record in runs_of(self.proc.pid):
                if record.get("server_pid"):
                    return run_dir, record
            time.sleep(0.05)
        raise AssertionError("serve recorded no started server")


def runs_of(launcher_pid: int) -> list[tuple[Path, dict]]:
    found = []
    for run_dir in Path(tempfile.gettempdir()).glob(f"{RUN_PREFIX}*"):
        try:
            record = json.loads((run_dir / RECORD).read_text())
        except (OSError, ValueError):
            continue
        if record["launcher_pid"] == launcher_pid:
            found.append((run_dir, record))
    return found


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group: the server and its python-backend stubs."""
    ps = subprocess.run(["ps", "-eo", "pid,pgid,stat,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [line for line in ps if line.split()[1] == str(pgid) and not line.split()[2].startswith("Z")]


def assert_nothing_left(launcher_pid: int, record: dict | None = None, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while record and group_members(record["server_pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if record:
        assert not group_members(record["server_pid"]), group_members(record["server_pid"])
        assert not list(Path("/dev/shm").glob(f"{record['shm_prefix']}*"))
    assert not runs_of(launcher_pid)


def slow_repository(root: Path, seconds: int = 120) -> Path:
    """A python-backend model whose loading takes `seconds`: a start-up that is still under way."""
    model = root / "slow"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "slow"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]\n'
                                        'output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]\n')
    (model / "1" / "model.py").write_text(f"import time\n\n\nclass TritonPythonModel:\n    def initialize(self, args):\n"
                                          f"        time.sleep({seconds})\n\n    def execute(self, requests):\n"
                                          f"        return []\n")
    return root


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_model_name_triton_cannot_serve_is_refused_before_start(tmp_path, exported_repository):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a b").symlink_to(exported_repository / "ncl", target_is_directory=True)
    started = time.monotonic()
    launcher = Launcher(tmp_path / "repo")
    _, err = launcher.finish()
    assert launcher.proc.returncode == 2 and time.monotonic() - started < 20
    assert "'a b'" in one_line(err) and "rename the folder" in err
    assert_nothing_left(launcher.proc.pid)


def test_sigterm_during_startup_stops_serve_and_triton_within_seconds(tmp_path):
    launcher = Launcher(slow_repository(tmp_path / "repo"))
    _, record = launcher.record()
    time.sleep(1.0)  # Triton is loading the slow model now
    assert group_members(record["server_pid"])
    sent = time.monotonic()
    launcher.proc.send_signal(signal.SIGTERM)
    out, err = launcher.proc.communicate(timeout=30)
    assert time.monotonic() - sent < 8, "SIGTERM was not honoured within seconds"
    assert launcher.proc.returncode == 0 and not err.strip()
    assert_nothing_left(launcher.proc.pid, record, within=2)


def test_sigkill_of_the_launcher_takes_triton_down_and_next_start_cleans_up(tmp_path, fused_only_repository):
    launcher = Launcher(fused_only_repository)
    launcher.wait_for("serving")
    run_dir, ready_record = launcher.record()
    launcher.proc.kill()
    launcher.proc.wait()
    deadline = time.monotonic() + 15
    while group_members(ready_record["server_pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_members(ready_record["server_pid"]), "Triton outlived its launcher"
    hung = Launcher(slow_repository(tmp_path / "slow"))  # the next start; its server will hang loading
    hung_dir, hung_record = hung.record()
    assert not run_dir.exists(), "the next start did not remove the dead launcher's folder"
    hung.proc.kill()
    hung.proc.wait()
    assert clean_stale_runs() == [str(hung_dir)]  # a server stuck loading is killed by the next start too
    assert_nothing_left(launcher.proc.pid, ready_record)
    assert_nothing_left(hung.proc.pid, hung_record)


def test_ports_held_by_another_server_are_refused(triton, exported_repository):
    launcher = Launcher(exported_repository, "--http-port", str(triton.endpoints.http_port))
    out, err = launcher.finish()
    line = one_line(err)
    assert launcher.proc.returncode == 1 and "serving" not in out
    assert f"port {triton.endpoints.http_port}" in line and "--http-port" in line
    assert triton.ready()
    assert_nothing_left(launcher.proc.pid)


def test_failed_models_are_named_with_tritons_reason(tmp_path):
    repo = tmp_path / "repo"
    for name in ("corrupt", "missing"):
        (repo / name / "1").mkdir(parents=True)
        write_config(repo / name, model_config(name, "onnxruntime_onnx", [TensorSpec("image", "UINT8", [32, 32, 3], "NHWC")],
                                               [TensorSpec("logits", "FP32", [10])], ServingOptions()))
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    launcher = Launcher(repo)
    line = one_line(launcher.finish()[1])
    assert launcher.proc.returncode == 1 and "model 'corrupt' version 1 failed to load" in line and "INVALID_PROTOBUF" in line
    assert "model 'missing' version 1 failed to load" in line and f"{repo}/missing/1/model.onnx" in line
    assert RUN_PREFIX not in line
    assert_nothing_left(launcher.proc.pid)


def test_models_refused_before_loading_are_named_with_tritons_reason(tmp_path):
    """A config Triton rejects and a model without a version folder: Triton's own last line says only 'failed to load
    all models'."""
    repo = tmp_path / "repo"
    for name in ("batching", "unversioned"):
        (repo / name).mkdir(parents=True)
        write_config(repo / name, model_config(name, "onnxruntime_onnx", [TensorSpec("image", "UINT8", [32, 32, 3], "NHWC")],
                                               [TensorSpec("logits", "FP32", [10])], ServingOptions(max_batch_size=4)))
    config = repo / "batching" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_delay_microseconds", "preferred_batch_size: 16\n  "
                                                                                "max_queue_delay_microseconds"))
    (repo / "batching" / "1").mkdir()
    (repo / "batching" / "1" / "model.onnx").write_bytes(b"never read")
    launcher = Launcher(repo)
    line = one_line(launcher.finish()[1])
    assert launcher.proc.returncode == 1 and "failed to load all models" not in line
    assert "model 'batching' failed to load: dynamic batching preferred size must be <= max batch size" in line
    assert "model 'unversioned' failed to load: at least one version must be available" in line
    assert_nothing_left(launcher.proc.pid)


def test_triton_killed_while_serving_is_reported_with_its_signal(fused_only_repository):
    launcher = Launcher(fused_only_repository)
    launcher.wait_for("serving")
    _, record = launcher.record()
    os.kill(record["server_pid"], signal.SIGKILL)
    _, err = launcher.proc.communicate(timeout=30)
    assert launcher.proc.returncode == 1 and "Triton was killed by signal SIGKILL while serving" in one_line(err)
    assert_nothing_left(launcher.proc.pid, record)
