"""bench.tune against the real bundled Triton on a tiny exported model: a 2-point grid, reloads through
explicit model control, the best config written back as a variant that the server then serves."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.tune import Point, apply, best_under, grid
from serve.repository import read_config
from serve.server import TritonServer
from tests.conftest import run_module


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
                      "--window-s", "0.5", "--latency-budget-ms", "100000", "--out", str(out), timeout=600)
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
