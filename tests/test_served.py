"""The served load generators: the Python one, perf_analyzer where a working binary is found, how one is chosen,
and `client_bound`, on the real bundled Triton."""
import json

import pytest

from bench.measure.served import (choose_load_generator, default_client_processes, feeds_ratios, find_perf_analyzer, measure_concurrency,
                          perf_analyzer_point, with_client_bound)
from bench.measure.timed_images import random_images
from expertfuse.errors import UserError
from tests.helpers import run_module
from tests.test_serve_faults import one_line

PERF_ANALYZER, PERF_ANALYZER_WHY = find_perf_analyzer()
needs_perf_analyzer = pytest.mark.skipif(
    PERF_ANALYZER is None, reason=f"no working perf_analyzer here ({PERF_ANALYZER_WHY}); README, bench: how to get one "
                                  "on glibc < 2.38, then set $PERF_ANALYZER and LD_LIBRARY_PATH")


def url_of(triton, protocol: str) -> str:
    return triton.endpoints.http if protocol == "http" else triton.endpoints.grpc


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("client", ["asyncio", "threads"])
def test_python_load_generator_reports_latency_server_split_and_its_own_cpu(triton, protocol, client):
    row = measure_concurrency(url_of(triton, protocol), protocol, "ncl_expert0", random_images(32), 1, 4,
                              window_s=0.3, client_kind=client)
    assert row["client"] == client and row["load_generator"] == "python" and row["requests"] > 0
    assert row["throughput"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0 and row["mean_ms"] > 0
    assert row["server_exec_per_request"] <= 1.0 and row["client_cpu_ms"] > 0
    assert row["client_processes"] == min(4, default_client_processes())
    assert 0 < max(row["client_busiest_thread_share"]) <= 1.05  # its schedstat was read
    assert row["client_bound"] == ("client_bound_why" in row)


def test_client_bound_when_one_python_process_drives_sixteen_requests(triton):
    """16 sync clients on threads of one process share its GIL: the client cannot keep 16 requests of a tiny model
    in flight, and the row says so and why; such a row feeds no ratio."""
    row = measure_concurrency(triton.endpoints.grpc, "grpc", "ncl_expert0", random_images(32), 1, 16,
                              window_s=0.3, max_processes=1, client_kind="threads")
    assert row["client_bound"] and row["client_bound_why"], row
    assert not feeds_ratios(row)


def test_client_bound_reasons_on_constructed_rows():
    base = {"concurrency": 4, "batch": 1, "throughput": 1000.0, "mean_ms": 4.0, "client_cpu_share": [0.3],
            "client_cpu_ms": 0.05, "server_queue_ms": 1.0, "server_compute_ms": 2.0, "measured": True}
    assert not with_client_bound(base)["client_bound"] and feeds_ratios(with_client_bound(base))
    saturated = with_client_bound({**base, "client_cpu_share": [0.5, 0.95]})
    assert saturated["client_bound_why"] == "a client process used 95% of a core"
    starved = with_client_bound({**base, "client_busiest_thread_share": [0.93]})
    assert starved["client_bound_why"] == "a client thread was on a core or waiting for one 93% of the time"
    short = with_client_bound({**base, "mean_ms": 3.0})  # 1000/s x 3 ms = 3 of 4 in flight
    assert short["client_bound_why"].startswith("3.00 requests in flight on average (throughput x mean latency) of "
                                                "the 4 asked for")
    base_batched = {**base, "server_exec_per_request": 0.5}  # two requests per execution: 1 ms of compute each
    assert not with_client_bound({**base_batched, "client_cpu_ms": 0.09})["client_bound"]
    costly = with_client_bound({**base_batched, "client_cpu_ms": 0.11})
    assert costly["client_bound_why"] == ("the client spent 0.110 ms of CPU per request, more than 10% of the "
                                          "server's 1.000 ms of compute per request")
    assert not any(feeds_ratios(r) for r in (saturated, starved, short, costly))
    assert not feeds_ratios({**base, "client_bound": False, "measured": False})


def test_a_placeholder_perf_analyzer_falls_back_to_python_with_the_reason(tmp_path):
    placeholder = tmp_path / "perf_analyzer"  # what pip's perf-analyzer 0.1.0 amounts to: no real binary
    placeholder.write_text("#!/bin/sh\necho 'perf_analyzer is not available for this platform'\n")
    placeholder.chmod(0o755)
    binary, note = choose_load_generator("auto", str(placeholder))
    assert binary is None and note == (f"load generator: python (perf_analyzer from --perf-analyzer ({placeholder}) "
                                       "is not a working binary: perf_analyzer is not available for this platform)")
    assert choose_load_generator("python", str(placeholder)) == (None, "load generator: python (--load-generator "
                                                                       "python)")
    with pytest.raises(UserError, match=r"^--load-generator perf_analyzer: perf_analyzer from --perf-analyzer"):
        choose_load_generator("perf_analyzer", str(placeholder))
    missing = find_perf_analyzer(str(tmp_path / "absent"))
    assert missing[0] is None and "does not run" in missing[1]


def test_bench_refuses_a_perf_analyzer_that_does_not_run_in_one_line(triton, tiny_checkpoint, tmp_path):
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), "--eval-limit", "20", "--served", "--grpc-url",
                      triton.endpoints.grpc, "--load-generator", "perf_analyzer", "--perf-analyzer",
                      str(tmp_path / "absent"), "--out", str(tmp_path / "bench"), check=False)
    assert proc.returncode == 2 and "in-process:" not in proc.stdout
    assert one_line(proc.stderr).startswith("error: --load-generator perf_analyzer: perf_analyzer from "
                                            "--perf-analyzer")


@needs_perf_analyzer
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_point_carries_the_fields_of_a_python_row(triton, protocol, tmp_path):
    row = perf_analyzer_point(PERF_ANALYZER, url_of(triton, protocol), protocol, "ncl_expert0", random_images(32),
                              1, 2, 0.3, tmp_path)
    python = measure_concurrency(url_of(triton, protocol), protocol, "ncl_expert0", random_images(32), 1, 2,
                                 window_s=0.3)
    assert row["load_generator"] == "perf_analyzer" and row["concurrency"] == 2 and row["throughput"] > 0
    assert row["p99_ms"] >= row["p50_ms"] > 0 and row["mean_ms"] > 0 and row["client_cpu_ms"] > 0
    python_only = {"window_throughputs", "requests", "client_processes", "client_cpu_share",
                   "client_busiest_thread_share", "not_measured"}
    assert set(python) - python_only <= set(row) | {"client_bound_why"}


@needs_perf_analyzer
def test_served_compare_writes_both_generators_side_by_side_without_machine_paths(exported_repository, tmp_path):
    out = tmp_path / "cmp"
    proc = run_module("bench.served_compare", "--repository", str(exported_repository), "--models", "ncl_expert0",
                      "--protocols", "grpc", "--concurrency", "1,2", "--rounds", "2", "--window-s", "0.3",
                      "--server", "bundled", "--out", str(out))
    result = json.loads((out / "comparison.json").read_text())
    assert [(p["round"], p["concurrency"]) for p in result["pairs"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    generators = [r["load_generator"] for r in result["rows"]]
    assert generators[:2] == ["perf_analyzer", "python"] and generators[4:6] == ["python", "perf_analyzer"]
    readme = (out / "README.md").read_text()
    assert "| 2 | grpc | ncl_expert0 | 2 |" in readme and "Load average (1/5/15 min):" in readme
    assert str(tmp_path) not in readme + (out / "comparison.json").read_text() + proc.stdout.split("# Served")[-1]


def test_perf_analyzer_is_fed_the_images_our_generator_times(tmp_path):
    """perf_analyzer's --input-data file holds the timed sample, one batch-1 entry per image, in order: both load
    generators drive a model with the same (evaluation) images, not perf_analyzer's one random tensor."""
    import base64

    import numpy as np

    from bench.measure.served import perf_analyzer_input_data
    from bench.measure.timed_images import timing_batches
    images = random_images(8, 10, seed=3)
    data = json.loads(perf_analyzer_input_data(images, 4, tmp_path).read_text())["data"]
    sent = np.stack([np.frombuffer(base64.b64decode(e["image"]["b64"]), np.uint8).reshape(8, 8, 3) for e in data])
    np.testing.assert_array_equal(sent, np.concatenate(timing_batches(images, 4)))
