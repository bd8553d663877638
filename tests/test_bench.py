import json

import numpy as np
import pytest
import torch

from bench.inprocess import check_parity, make_runner, sweep
from export.common import job_for
from bench.runners import TritonRunner
from bench.served import parse_perf_analyzer_csv
from tests.helpers import run_module
from train.checkpoint import load_checkpoint, save_checkpoint

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_runners_agree_with_the_reference_and_a_wrong_one_is_refused(tiny_checkpoint, tmp_path):
    images = np.random.RandomState(3).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ensemble = job_for(tiny_checkpoint, "all", "grouped")
    for runtime in ("torch-cpu", "onnxruntime-cpu"):
        runner = make_runner(runtime, ensemble, "grouped", tmp_path)
        assert check_parity(runner, ensemble.model, ensemble.opts.experts, images)["ok"], runtime
        rows = sweep(runner, 32, [1, 2], window_s=0.05)
        assert [r["batch"] for r in rows] == [1, 2] and all(r["items_per_s"] > 0 for r in rows)
    single = make_runner("onnxruntime-cpu", job_for(tiny_checkpoint, "1", "loop"), "loop", tmp_path)
    verdict = check_parity(single, ensemble.model, ensemble.opts.experts, images)  # expert 1 is not the ensemble
    assert not verdict["ok"] and verdict["max_abs_diff"] > 1e-3


def test_triton_runner_with_and_without_shared_memory(triton, tiny_checkpoint):
    images = np.random.RandomState(4).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    job = job_for(tiny_checkpoint, "all", "loop")
    results = []
    for protocol, url in (("http", triton.endpoints.http), ("grpc", triton.endpoints.grpc)):
        for shm in (False, True):
            runner = TritonRunner(url, protocol, "ncl", shared_memory=shm)
            try:
                assert check_parity(runner, job.model, job.opts.experts, images)["ok"], (protocol, shm)
                results.append(runner.logits(images))
            finally:
                runner.close()
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_served_bench_writes_json_csv_and_plots(triton, tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), "--runtimes", "onnxruntime-cpu", "--batches", "1",
                      "--window-s", "0.1", "--served", "--http-url", triton.endpoints.http, "--grpc-url",
                      triton.endpoints.grpc, "--concurrency", "2", "--protocols", "grpc", "--client-processes", "2",
                      "--out", str(out))
    assert "## Headline" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    roles = {r["model_role"] for r in result["served"]}
    assert roles == {"fused", "single", "naive"}
    fused = next(r for r in result["served"] if r["model_role"] == "fused")
    assert fused["throughput"] > 0 and fused["p99_ms"] >= fused["p50_ms"] > 0 and "server_exec_per_request" in fused
    assert all(r["parity_max_abs_diff"] <= 1e-3 and r["parity_top1_agreement"] == 1.0 for r in result["served"])
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]["packages"]
    assert result["headline"]["fused_vs_naive"] and result["headline"]["ensemble_cost"]
    header = (out / "served.csv").read_text().splitlines()[0]
    assert "throughput" in header and "p95_ms" in header
    for name in ("throughput_vs_batch.png", "latency_vs_concurrency.png", "single_vs_ensemble.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_served_bench_refuses_a_server_running_another_model(triton, tiny_checkpoint, tmp_path):
    """The served models come from tiny_checkpoint; a bench of a retrained checkpoint must not time them."""
    data = load_checkpoint(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    data["state_dict"] = {k: v + 0.3 * torch.randn(v.shape, generator=generator) if k.endswith("conv1.weight") else v
                          for k, v in data["state_dict"].items()}
    save_checkpoint(data, tmp_path / "retrained.pt")
    out = tmp_path / "bench"
    proc = run_module("bench", "--ckpt", str(tmp_path / "retrained.pt"), "--no-inprocess", "--served",
                      "--http-url", triton.endpoints.http, "--grpc-url", triton.endpoints.grpc, "--concurrency", "1",
                      "--window-s", "0.1", "--out", str(out))
    assert proc.stdout.count("REFUSED") == 6  # fused, single and naive over HTTP and gRPC
    served = json.loads((out / "bench.json").read_text())["served"]
    assert len(served) == 6 and all(r["refused"] == "parity" and "throughput" not in r for r in served)
    assert "refused to time served ncl_naive (naive) over grpc: parity" in (out / "summary.md").read_text()


def test_perf_analyzer_csv_is_parsed_in_ms_and_sorted_by_concurrency():
    rows = parse_perf_analyzer_csv((DATA / "perf_analyzer.csv").read_text())
    assert [r["concurrency"] for r in rows] == [1, 4, 8]
    assert rows[0]["throughput"] == pytest.approx(2952.4) and rows[0]["p99_ms"] == pytest.approx(0.422)
    assert rows[2]["server_compute_ms"] == pytest.approx((18 + 102 + 9) / 1000)


def test_bench_refuses_unknown_runtimes(tiny_checkpoint):
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), "--runtimes", "tensorrt-magic", check=False)
    assert proc.returncode == 2 and "not available here" in proc.stderr


def test_demo_pipeline_runs_end_to_end_in_reduced_form(tmp_path):
    proc = run_module("bench.demo", "--quick", "--out", str(tmp_path / "demo"), timeout=900)
    for title in ("train NCL", "export the fused ensemble", "classify images over HTTP", "classify images over gRPC",
                  "bench single expert vs ensemble", "Triton stopped", "demo finished"):
        assert title in proc.stdout, title
    summary = (tmp_path / "demo" / "bench" / "summary.md").read_text()
    assert "fused vs naive Triton ensemble" in summary and "ensemble cost" in summary


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_asyncio_load_generator(triton, protocol):
    from bench.served import measure_concurrency
    url = triton.endpoints.http if protocol == "http" else triton.endpoints.grpc
    row = measure_concurrency(url, protocol, "ncl_expert0", 32, 1, 4, window_s=0.3, max_processes=1, client_kind="asyncio")
    assert row["client"] == "asyncio" and row["requests"] > 0 and row["throughput"] > 0
    assert row["server_exec_per_request"] <= 1.0
