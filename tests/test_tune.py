"""bench.tune against the real bundled Triton on a tiny exported model: a 2-point grid, reloads through
explicit model control, the best config written back as a variant that the server then serves."""
from __future__ import annotations

import csv
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bench.tune import Point, apply, best_under, grid
from serve.repository import ServingOptions, TensorSpec, model_config, read_config, write_config
from serve.server import TritonServer
from tests.helpers import REPO, run_module
from tests.test_serve_faults import assert_nothing_left, one_line, runs_of


@pytest.fixture
def repository(exported_repository, tmp_path):
    """A private copy holding only the fused model (the variant is written into it)."""
    repo = tmp_path / "model_repository"
    shutil.copytree(exported_repository / "ncl", repo / "ncl")
    return repo


def test_apply_changes_batching_and_instances_and_keeps_warmup_within_the_batch(exported_repository):
    cfg = read_config(exported_repository / "ncl")
    assert [w.batch_size for w in cfg.model_warmup] == [1, 16]
    tuned = apply(cfg, Point(instances=2, max_batch=8, preferred=(4, 8), queue_delay_us=500))
    assert tuned.max_batch_size == 8 and tuned.instance_group[0].count == 2
    assert list(tuned.dynamic_batching.preferred_batch_size) == [4, 8]
    assert tuned.dynamic_batching.max_queue_delay_microseconds == 500
    assert [w.batch_size for w in tuned.model_warmup] == [1, 8]  # Triton refuses a warmup above max_batch_size
    assert tuned.parameters["expertfuse_experts"] == cfg.parameters["expertfuse_experts"]  # metadata travels
    assert cfg.max_batch_size == 16  # the original is untouched


def test_grid_and_budget_choice():
    points = grid([1, 2], [8], ["none", "max", "4+8+99"], [0])
    assert {p.preferred for p in points} == {(), (8,), (4, 8)} and len(points) == 6
    rows = [{"config": "a", "throughput": 90.0, "p99_ms": 30.0}, {"config": "b", "throughput": 60.0, "p99_ms": 9.0},
            {"config": "c", "throughput": 50.0, "p99_ms": 5.0}, {"config": "d", "error": "load failed"}]
    assert best_under(rows, 10.0)["config"] == "b" and best_under(rows, 1.0) is None


def test_tune_sweeps_real_triton_and_writes_a_served_variant(repository, tmp_path):
    out = tmp_path / "tune"
    proc = run_module("bench.tune", "--repository", str(repository), "--model", "ncl", "--server", "bundled",
                      "--instances", "1", "--max-batch-sizes", "4,16", "--queue-delays-us", "0", "--concurrency", "2",
                      "--window-s", "0.2", "--latency-budget-ms", "100000", "--out", str(out), timeout=600)
    rows = list(csv.DictReader((out / "tune.csv").open()))
    assert [r["config"] for r in rows] == ["i1 b4 p- d0", "i1 b16 p- d0"], proc.stdout
    assert all(float(r["throughput"]) > 0 and not r["error"] for r in rows)
    assert (out / "latency_throughput.png").stat().st_size > 0 and "## Every point" in (out / "tune.md").read_text()
    best = max(rows, key=lambda r: float(r["throughput"]))
    tuned = read_config(repository / "ncl_tuned")
    assert tuned.max_batch_size == int(best["max_batch"]) and read_config(repository / "ncl").max_batch_size == 16
    assert (repository / "ncl_tuned" / "1" / "model.onnx").samefile(repository / "ncl" / "1" / "model.onnx")
    images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with TritonServer(repository, "bundled", ready_timeout=120) as server:
        client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        try:
            served = client.get_model_config("ncl_tuned").config
            logits = {}
            for model in ("ncl", "ncl_tuned"):
                request = grpcclient.InferInput("image", list(images.shape), "UINT8")
                request.set_data_from_numpy(images)
                logits[model] = client.infer(model, [request]).as_numpy("logits")
        finally:
            client.close()
    assert served.max_batch_size == tuned.max_batch_size
    assert np.array_equal(logits["ncl"], logits["ncl_tuned"])


def test_tune_refuses_what_it_cannot_tune(repository, tmp_path):
    proc = run_module("bench.tune", "--repository", str(repository), "--model", "ncl", "--max-batch-sizes", "64",
                      check=False)
    assert proc.returncode == 2 and "1..16" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("bench.tune", "--repository", str(repository), "--model", "nope", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "nope" in proc.stderr


@pytest.mark.parametrize("flags", [["--queue-delays-us", ""], ["--queue-delays-us", "-5"], ["--window-s", "0"],
                                   ["--ready-timeout", "-5"], ["--load-timeout", "0"], ["--latency-budget-ms", "-1"],
                                   ["--preferred-batch-sizes", ""]])
def test_tune_refuses_an_empty_or_invalid_grid_before_anything_starts(flags, repository, tmp_path):
    proc = run_module("bench.tune", "--repository", str(repository), "--model", "ncl", "--max-batch-sizes", "8",
                      *flags, "--out", str(tmp_path / "tune"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(("python -m bench.tune: error: argument", "error: "))
    assert not (tmp_path / "tune").exists()


def failing_repository(root) -> object:
    """A python-backend model the load generator can drive whose every request fails."""
    model = root / "broken"
    (model / "1").mkdir(parents=True)
    write_config(model, model_config("broken", "python", [TensorSpec("image", "UINT8", [32, 32, 3], "NHWC")],
                                     [TensorSpec("logits", "FP32", [10])], ServingOptions(max_batch_size=8, warmup_batch_sizes=[])))
    (model / "1" / "model.py").write_text("class TritonPythonModel:\n    def execute(self, requests):\n"
                                          "        raise RuntimeError('broken on purpose')\n")
    return root


def test_tune_where_every_point_failed_writes_its_results_and_exits_non_zero(tmp_path):
    out = tmp_path / "tune"
    proc = run_module("bench.tune", "--repository", str(failing_repository(tmp_path / "repo")), "--model", "broken",
                      "--server", "bundled", "--instances", "1", "--max-batch-sizes", "8", "--queue-delays-us", "0",
                      "--concurrency", "1", "--window-s", "0.1", "--out", str(out), check=False)
    assert proc.returncode == 1 and "every point failed (first: i1 b8 p- d0: " in one_line(proc.stderr)
    assert list(csv.DictReader((out / "tune.csv").open()))[0]["error"]
    assert not (tmp_path / "repo" / "broken_tuned").exists()


def load_processes(parent: int) -> list[int]:
    """The bench's load-generating client processes (multiprocessing spawn children of `parent`)."""
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in ps if line.split()[1] == str(parent) and "multiprocessing.spawn" in line]


class Tune:
    """bench.tune in its own process group (as a terminal runs it), measuring one slow point."""

    def __init__(self, repository, out):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.tune", "--repository", str(repository), "--model",
                                      "ncl", "--server", "bundled", "--instances", "1", "--max-batch-sizes", "8",
                                      "--queue-delays-us", "0", "--concurrency", "2", "--client-processes", "2",
                                      "--window-s", "20", "--out",
                                      str(out)], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def load_processes(self) -> list[int]:
        return load_processes(self.proc.pid)

    def wait_measuring(self, timeout: float = 120) -> dict:
        """The launcher record of its Triton, once both load processes are up and the server has answered more
        requests than their warm-ups (so the clients are past start-up, in their measuring loops)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (len(self.load_processes()) == 2 and self.requests_served() > 20):
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.1)
        assert len(self.load_processes()) == 2 and self.requests_served() > 20
        return next(record for _, record in runs_of(self.proc.pid))

    def requests_served(self) -> int:
        """Requests Triton answered for the model, read over HTTP at the port its log names (0 before that)."""
        logs = [run_dir / "server.log" for run_dir, _ in runs_of(self.proc.pid)]
        found = [m for log in logs if log.exists()
                 for m in re.findall(r"Started HTTPService at ([\d.]+:\d+)", log.read_text(errors="replace"))]
        if not found:
            return 0
        client = httpclient.InferenceServerClient(found[0])
        try:
            stats = client.get_inference_statistics("ncl")["model_stats"]
        except (InferenceServerException, OSError):
            return 0
        finally:
            client.close()
        return sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0)) for m in stats)


@pytest.mark.parametrize("sig, code, message", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_signal_during_a_tune_measurement_stops_everything_in_one_line(sig, code, message, repository, tmp_path):
    tune = Tune(repository, tmp_path / "tune")
    record = tune.wait_measuring()
    clients = tune.load_processes()
    if sig == signal.SIGINT:
        os.killpg(tune.proc.pid, sig)  # Ctrl-C at a terminal reaches the whole foreground group
    else:
        tune.proc.send_signal(sig)
    _, err = tune.proc.communicate(timeout=60)
    assert tune.proc.returncode == code and err.strip() == message
    assert not [pid for pid in clients if os.path.exists(f"/proc/{pid}")]
    assert_nothing_left(tune.proc.pid, record)


def test_triton_killed_during_a_tune_names_the_point_and_the_servers_last_words(repository, tmp_path):
    tune = Tune(repository, tmp_path / "tune")
    record = tune.wait_measuring()
    os.kill(record["server_pid"], signal.SIGKILL)
    _, err = tune.proc.communicate(timeout=60)
    line = one_line(err)
    assert tune.proc.returncode != 0
    assert "Triton was killed by signal SIGKILL while measuring config i1 b8 p- d0 at concurrency 2: " in line
    assert_nothing_left(tune.proc.pid, record)
