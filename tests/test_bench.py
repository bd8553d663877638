import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import csv
from types import SimpleNamespace

from bench.decide import accuracy_columns, best_single, cost_accuracy, decision, inprocess_ratios, mark_pareto
from bench.measure.evaluation import accuracy, collapsed, gain_interval
from export.data_flags import LabelledData
from export.labelled import EvalSet, load_eval_set
from bench.measure.inprocess import (References, Variant, gate_and_score, make_runner, plan_variants, reference_key,
                                     with_repository_exports)
from bench.measure.machine import machine_info
from bench.report import write_all
from bench.measure.runners import TritonRunner
from bench.served_stage import score_model
from expertfuse.errors import UserError
from expertfuse.files import report_name
from expertfuse.parity import BENCH_FP32, compare
from expertfuse.timing import Interleaved
from export.job import job_for
from export.graph import reference_logits
from bench.measure.served import parse_perf_analyzer_csv
from tests.helpers import REPO, run_module
from tests.test_serve_faults import assert_nothing_left, one_line, runs_of, slow_repository
from tests.test_tune import load_processes
from train.checkpoint import load_checkpoint, save_checkpoint

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_runners_agree_with_the_reference_and_a_wrong_one_is_refused(tiny_checkpoint, tmp_path):
    job = job_for(tiny_checkpoint, "all", "loop")
    data = small_eval_set(job)
    refs = References.build(job.model, data, gate_images=4)
    ensemble = Variant("ensemble-grouped", (0, 1, 2), "grouped")
    for runtime in ("torch-cpu", "onnxruntime-cpu"):
        verdict = gate_and_score(make_runner(runtime, job, ensemble, tmp_path), ensemble.experts, "fp32", refs, data)
        assert "refused" not in verdict and verdict["accuracy"]["agreement"] == 100.0, runtime
    single = make_runner("onnxruntime-cpu", job, Variant("expert1", (1,)), tmp_path)
    verdict = gate_and_score(single, ensemble.experts, "fp32", refs, data)  # expert 1 is not the ensemble
    assert verdict["refused"] == "parity on random images" and not verdict["parity_random"]["ok"]


def small_eval_set(job, limit: int = 40) -> EvalSet:
    """The checkpoint's own evaluation split, a few images of every class."""
    return load_eval_set(job.checkpoint.data, job.spec, LabelledData(limit=limit))


def test_accuracy_through_onnxruntime_and_the_bundled_triton_are_equal(triton, tiny_checkpoint, tmp_path):
    job = job_for(tiny_checkpoint, "all", "loop")
    data = small_eval_set(job)
    refs = References.build(job.model, data, gate_images=4)
    local = gate_and_score(make_runner("onnxruntime-cpu", job, Variant("e", (0, 1, 2), "grouped"), tmp_path),
                           (0, 1, 2), "fp32", refs, data)
    ctx = SimpleNamespace(num_experts=3, refs=refs, data=data, inprocess_logits={reference_key((0, 1, 2), "fp32", None): local["logits"]})
    for protocol, url in (("http", triton.endpoints.http), ("grpc", triton.endpoints.grpc)):
        served = score_model(url, protocol, "ncl", "fused", {"expertfuse_experts": "0,1,2"}, ctx)
        assert served["parity_labelled"]["ok"] and served["parity_labelled"]["samples"] == len(data.labels)
        assert served["parity_labelled"]["against"] == "in-process", protocol
        assert served["accuracy"] == local["accuracy"], protocol


def test_accuracy_gain_interval_on_a_constructed_case():
    counts = [300] * 5 + [10] * 5  # strict rule: classes 0-4 many, 5-9 few
    labels = np.repeat(np.arange(10), 100)
    data = EvalSet(np.zeros((1000, 2, 2, 3), np.uint8), labels, counts, "strict", "constructed")
    baseline = np.where(np.random.default_rng(1).random(1000) < 0.7, labels, (labels + 1) % 10)
    better = baseline.copy()
    fixed = np.flatnonzero((better != labels) & (labels >= 5))[:50]  # 50 more right, all in few-shot classes
    better[fixed] = labels[fixed]
    gain = gain_interval(better, baseline, data)
    assert gain["overall"]["points"] == pytest.approx(5.0) and gain["few"]["points"] == pytest.approx(10.0)
    assert 3.0 < gain["overall"]["ci95"][0] < 5.0 < gain["overall"]["ci95"][1] < 7.0
    same = gain_interval(baseline, baseline, data)
    assert same["overall"]["ci95"] == [0.0, 0.0]  # identical predictions: no gain, whatever the resample


def test_shot_group_accuracy_on_a_constructed_case():
    counts = [200, 150, 50, 30, 10, 5]  # strict rule: many 0,1; medium 2,3; few 4,5
    labels = np.repeat(np.arange(6), 10)
    data = EvalSet(np.zeros((60, 2, 2, 3), np.uint8), labels, counts, "strict", "constructed")
    right = {0: 10, 1: 8, 2: 6, 3: 4, 4: 2, 5: 0}  # images of each class predicted correctly
    pred = np.concatenate([[c] * right[c] + [(c + 1) % 6] * (10 - right[c]) for c in range(6)])
    logits = np.eye(6)[pred]
    acc = accuracy(logits, data, reference_pred=labels)
    assert acc["overall"] == pytest.approx(100 * 30 / 60)
    assert (acc["many"], acc["medium"], acc["few"]) == pytest.approx((90.0, 50.0, 10.0))
    assert acc["per_class"] == [100.0, 80.0, 60.0, 40.0, 20.0, 0.0]
    assert acc["agreement"] == pytest.approx(50.0) and acc["classes_predicted"] == 6
    assert not collapsed(acc) and collapsed({"per_class": [90.0, 0, 0, 0, 0, 10.0]})


def test_cost_accuracy_report_is_well_formed(tmp_path):
    rng = np.random.default_rng(0)
    blocks = lambda t: [list(t * rng.normal(1, 0.01, 3)) for _ in range(20)]  # noqa: E731
    timings = {b: Interleaved({f"{n}@onnxruntime-cpu": blocks(t * b) for n, t in
                               (("expert0", 1.0), ("expert1", 1.0), ("ensemble-loop", 3.0), ("ensemble-grouped", 2.5))})
               for b in (1, 64)}
    acc = lambda o, f: {"overall": o, "many": o + 10, "medium": o, "few": f, "agreement": 90.0}  # noqa: E731
    variants = {"expert0": {"experts": [0], "precision": "fp32", "fusion": "loop", "accuracy": acc(60.0, 20.0)},
                "expert1": {"experts": [1], "precision": "fp32", "fusion": "loop", "accuracy": acc(55.0, 40.0)},
                "ensemble-loop": {"experts": [0, 1], "precision": "fp32", "fusion": "loop", "accuracy": acc(65.0, 45.0)},
                "ensemble-grouped": {"experts": [0, 1], "precision": "fp32", "fusion": "grouped",
                                     "accuracy": acc(65.0, 45.0)}}
    single = best_single(variants, [0, 1])
    assert best_single(variants, [1, 0]) == "expert1"  # the calibration split's pick, not the scored split's
    gains = {"overall": {"points": 5.0, "ci95": [4.0, 6.0]}, "few": {"points": 25.0, "ci95": [15.0, 35.0]}}
    ratios = inprocess_ratios(variants, timings, "onnxruntime-cpu", single)
    points = cost_accuracy(variants, timings, "onnxruntime-cpu", single)
    mark_pareto(points)
    result = {"checkpoint": "c.pt", "machine": machine_info(), "single": single, "ratios": ratios, "points": points,
              "decision": decision(points, ratios, single, lambda a, b: gains), "inprocess": [], "served": {},
              "evaluation": {"source": "constructed split", "chosen_on": "another split", "shot_rule": "strict"}}
    files = write_all(result, tmp_path)
    assert single == "expert0"
    summary = (tmp_path / "summary.md").read_text()
    lead = summary.splitlines()[2]
    assert "Scored on the constructed split" in summary and "Chosen on the another split (disjoint)" in summary
    assert lead.startswith("**The ensemble (ensemble-grouped) buys +5.0 [+4.0, +6.0] points overall, +25.0 [+15.0, "
                           "+35.0] on few-shot classes, for 2.") and lead.endswith("against the best single expert (expert0).**")
    saved = json.loads((tmp_path / "bench.json").read_text())
    ens = next(p for p in saved["points"] if p["name"] == "ensemble-grouped")
    assert ens["cost_b1"]["ratio"] == pytest.approx(2.5, rel=0.05) and ens["pareto_cost_small_overall"]
    assert not next(p for p in saved["points"] if p["name"] == "ensemble-loop")["pareto_cost_small_overall"]
    rows = list(csv.DictReader(open(tmp_path / "cost_accuracy.csv")))
    assert {"name", "overall", "few", "cost_b1", "cost_b1_low", "cost_b64_reliable"} <= set(rows[0])
    assert len(rows) == 4
    assert (tmp_path / "cost_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tmp_path / "ratios.csv" in files


def test_triton_runner_with_and_without_shared_memory(triton, tiny_checkpoint):
    images = np.random.RandomState(4).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    job = job_for(tiny_checkpoint, "all", "loop")
    results = []
    for protocol, url in (("http", triton.endpoints.http), ("grpc", triton.endpoints.grpc)):
        for shm in (False, True):
            runner = TritonRunner(url, protocol, "ncl", shared_memory=shm)
            try:
                ref = reference_logits(job.model, job.opts.experts, torch.from_numpy(images), "uint8-nhwc").numpy()
                assert compare(runner.logits(images), ref, BENCH_FP32).ok, (protocol, shm)
                results.append(runner.logits(images))
                regions = len(runner._regions)
                parts = runner.prepare_all([images[:1], images[1:]])  # shm: one input region, each batch at its offset
                assert len(runner._regions) == regions + 2 * shm
                np.testing.assert_array_equal(np.concatenate([runner.run(p) for p in parts]), results[-1])
            finally:
                runner.close()
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_served_bench_writes_json_csv_and_plots(triton, tiny_checkpoint, tmp_path):
    """The served stage alone (the demo's test covers the in-process stage and both together): our load generator's
    sweep over gRPC with two client processes (perf_analyzer's: tests/test_served.py) and the interleaved run through
    shared memory."""
    out = tmp_path / "bench"
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), "--no-inprocess", "--eval-limit", "40", "--budget-s",
                      "0.5", "--window-s", "0.1", "--served", "--http-url", triton.endpoints.http, "--grpc-url",
                      triton.endpoints.grpc, "--concurrency", "1,2", "--protocols", "grpc", "--client-processes", "2",
                      "--load-generator", "python", "--shared-memory", "--out", str(out))
    assert "## Cost and accuracy" in proc.stdout and "in-process:" not in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    assert result["inprocess"] == [] and {p["where"] for p in result["points"]} == {"triton-grpc"}
    models = result["served"]["models"]
    assert {m["model_role"] for m in models} >= {"fused", "single", "naive"}
    assert all(m["parity_labelled"]["ok"] and m["parity_labelled"]["samples"] == 40 for m in models)
    assert next(m for m in models if m["model"] == f"ncl_{result['single']}")["model_role"] == "single"
    fused = [r for r in result["served"]["sweep"] if r["model_role"] == "fused"]
    assert [r["concurrency"] for r in fused] == [1, 2] and fused[0]["p99_ms"] >= fused[0]["p50_ms"] > 0
    assert {r["client_processes"] for r in result["served"]["sweep"]} == {1, 2}
    names = {r["ratio_name"] for r in result["ratios"]}
    assert {"fused / naive (served)", "served / in-process", "ensemble / single (served)"} <= names
    assert all(r["ci95"][0] <= r["ratio"] <= r["ci95"][1] and r["samples"] > 0 for r in result["ratios"])
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]["packages"]
    header = (out / "served.csv").read_text().splitlines()[0]
    assert "throughput" in header and "p95_ms" in header
    assert (out / "served_latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_no_machine_path(out, tmp_path, tiny_checkpoint.parent)


def assert_no_machine_path(out: Path, *folders: Path) -> None:
    """A bench's written reports name no folder of this machine (the checkpoint's, the run's)."""
    for written in out.iterdir():
        if written.suffix in (".json", ".md", ".csv"):
            text = written.read_text()
            assert not [str(f) for f in folders if str(f) in text], written.name


def test_the_bench_reuses_only_the_repositorys_exports_of_the_same_checkpoint(exported_repository, tiny_checkpoint):
    import hashlib
    planned = plan_variants([0, 1, 2])
    sha256 = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    same = {v.name: v.exported for v in with_repository_exports(planned, exported_repository, sha256, 3)}
    assert same["ensemble-grouped"] == ("ncl", exported_repository / "ncl" / "1" / "model.onnx")
    assert [same[f"expert{k}"][0] for k in range(3)] == ["ncl_expert0", "ncl_expert1", "ncl_expert2"]
    assert same["ensemble-loop"] is same["best2"] is same["ensemble-fp16"] is None  # not in the repository
    assert all(v.exported is None for v in with_repository_exports(planned, exported_repository, "0" * 64, 3))


def test_served_bench_refuses_a_server_running_another_model(triton, tiny_checkpoint, tmp_path):
    """The served models come from tiny_checkpoint; a bench of a retrained checkpoint must not time them."""
    data = load_checkpoint(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    data["state_dict"] = {k: v + 0.3 * torch.randn(v.shape, generator=generator) if k.endswith("conv1.weight") else v
                          for k, v in data["state_dict"].items()}
    save_checkpoint(data, tmp_path / "retrained.pt")
    out = tmp_path / "bench"
    proc = run_module("bench", "--ckpt", str(tmp_path / "retrained.pt"), "--no-inprocess", "--served", "--eval-limit",
                      "20", "--http-url", triton.endpoints.http, "--grpc-url", triton.endpoints.grpc,
                      "--concurrency", "1", "--window-s", "0.1", "--out", str(out), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no served model was measured: every model of")
    assert proc.stdout.count("REFUSED") == 10  # fused, naive and the 3 experts over HTTP and gRPC
    served = json.loads((out / "bench.json").read_text())["served"]
    assert len(served["models"]) == 10 and all(m["refused"] == "parity on random images" for m in served["models"])
    assert served["sweep"] == [] and served["ratios"] == []
    summary = (out / "summary.md").read_text()
    assert "refused to time served ncl_naive (naive) over grpc: parity on random images" in summary
    assert "**nothing served was measured**; the server has: ncl, ncl_expert0, ncl_expert1, ncl_expert2, " in summary


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
                  "bench every variant's accuracy and cost", "what the ensemble buys", "training check:",
                  "Triton stopped", "demo finished"):
        assert title in proc.stdout, title
    bench = tmp_path / "demo" / "bench"
    summary = (bench / "summary.md").read_text()
    assert summary.splitlines()[2].lstrip("*").startswith("The ensemble (ensemble-")
    # the served ratios, or, when a loaded machine left their interleaved run short of rounds, the reason they are not
    assert "fused / naive (served)" in summary or "- the served ratios and costs (interleaved at concurrency 1): " in summary
    result = json.loads((bench / "bench.json").read_text())
    for runtime in ("torch-cpu", "onnxruntime-cpu"):  # the repository's files of this checkpoint, still gated
        reused = {r["variant"]: r.get("exported_from") for r in result["inprocess"] if r["runtime"] == runtime}
        assert reused == {"expert0": "ncl_expert0", "expert1": "ncl_expert1", "expert2": "ncl_expert2", "best2": None,
                          "ensemble-loop": None, "ensemble-grouped": "ncl", "ensemble-fp16": None}, runtime
    assert all(r["parity_random"]["ok"] for r in result["inprocess"] if r.get("exported_from")), result["inprocess"]
    assert {"ensemble / single", "grouped / loop", "fp16 / fp32"} <= {r["ratio_name"] for r in result["ratios"]}
    assert {p["where"] for p in result["points"]} >= {"onnxruntime-cpu", "triton-http", "triton-grpc"}
    assert {m["protocol"] for m in result["served"]["models"]} == {"http", "grpc"}
    rows = list(csv.DictReader(open(bench / "cost_accuracy.csv")))
    assert {"name", "overall", "few", "cost_b1", "cost_b1_low"} <= set(rows[0]) and len(rows) == len(result["points"])
    assert result["checkpoint"] == "ncl.pt" and result["plots"] == ["cost_accuracy.png", "served_latency_throughput.png"]
    for name in result["plots"]:
        assert (bench / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_no_machine_path(bench, tmp_path)


def test_demo_training_check_names_a_collapsed_expert_and_an_ensemble_behind_its_best_expert():
    from bench.demo import training_check
    row = lambda name, overall, right: {"variant": name, "runtime": "onnxruntime-cpu",  # noqa: E731
                                        "accuracy": {"overall": overall, "per_class": [50.0] * right + [0.0] * (10 - right)}}
    result = {"inprocess": [row("expert0", 30.0, 3), row("expert1", 70.0, 9), row("ensemble-loop", 69.5, 9)],
              "decision": {"gain_ci95": {"overall": [-1.2, 0.3]}}}
    problems = training_check(result)
    assert problems[0] == "expert0 collapsed: right on 3 of 10 classes"
    assert problems[1] == ("the ensemble (69.5%) is less accurate than its best expert (70.0%) "
                           "(the gain's 95% interval over the evaluation images: [-1.2, +0.3])")
    result["inprocess"][2]["accuracy"]["overall"] = 70.0
    assert training_check(result) == ["expert0 collapsed: right on 3 of 10 classes"]


@pytest.mark.parametrize("flags", [["--batches", "0"], ["--batches", ""], ["--concurrency", "1,-2"],
                                   ["--client-processes", "0"], ["--served-batch", "two"], ["--protocols", "http,ftp"],
                                   ["--server", "cloud"], ["--window-s", "0"], ["--budget-s", "-1"],
                                   ["--runtimes", ""], ["--window-s", "nan"]])
def test_bench_refuses_bad_load_flags_in_one_line(flags, tiny_checkpoint):
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), *flags, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("python -m bench: error: argument")


def test_bench_and_tune_parse_and_spawn_load_processes_without_torch():
    """What a flag error and every spawned load process import (they re-import the command's module): no torch, no
    ONNX Runtime, so a typo is refused at once and a client process is up in a fraction of a second."""
    code = ("import sys, bench.__main__, bench.tune, bench.measure.served, bench.measure.machine; "
            "print(sorted({'torch', 'torchvision', 'onnxruntime', 'onnx'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_served_bench_checks_every_server_before_measuring_anything(tiny_checkpoint, tmp_path):
    proc = run_module("bench", "--ckpt", str(tiny_checkpoint), "--eval-limit", "20", "--served", "--http-url",
                      "127.0.0.1:1", "--grpc-url", "127.0.0.1:2", "--out", str(tmp_path / "bench"), check=False)
    assert proc.returncode == 2 and "in-process:" not in proc.stdout and not (tmp_path / "bench").exists()
    assert one_line(proc.stderr).startswith("error: cannot reach Triton at 127.0.0.1:1 over http (--http-url): ")


def test_served_bench_uses_the_one_server_given_and_names_its_models_when_none_is_the_checkpoints(
        triton, tiny_checkpoint, tmp_path):
    common = ["bench", "--ckpt", str(tiny_checkpoint), "--eval-limit", "20", "--served", "--http-url",
              triton.endpoints.http, "--out", str(tmp_path / "bench")]
    proc = run_module(*common, "--protocols", "http,grpc", check=False)
    assert proc.returncode == 2 and "in-process:" not in proc.stdout
    assert one_line(proc.stderr) == "error: --protocols http,grpc with only --http-url: give --grpc-url too, or " \
                                    "--protocols http"
    proc = run_module(*common, "--model", "m", check=False)  # an export named m; --model defaults to the method
    assert proc.returncode == 2 and "in-process:" not in proc.stdout and "starting Triton" not in proc.stdout
    line = one_line(proc.stderr)
    assert f"no model of {tiny_checkpoint} to measure at {triton.endpoints.http}: looked for m, m_naive" in line
    assert "the server has ncl, ncl_expert0, ncl_expert1, ncl_expert2, ncl_naive, ncl_naive_mean" in line


def test_sigterm_stops_a_served_bench_its_triton_and_load_processes_and_removes_its_folders(
        tiny_checkpoint, exported_repository, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("expertfuse-bench-*"))
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--ckpt", str(tiny_checkpoint), "--no-inprocess",
                              "--eval-limit", "20", "--served", "--repository", str(exported_repository), "--server",
                              "bundled", "--protocols", "grpc", "--concurrency", "2", "--load-generator", "python",
                              "--client-processes", "2", "--window-s", "20", "--out",
                              str(tmp_path / "bench")], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(load_processes(bench.pid)) < 2:
        assert bench.poll() is None, bench.communicate()
        time.sleep(0.2)
    clients, record = load_processes(bench.pid), next(record for _, record in runs_of(bench.pid))
    assert len(clients) == 2
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=60)
    assert bench.returncode == 143 and err.strip() == "stopped by SIGTERM"
    assert not [pid for pid in clients if os.path.exists(f"/proc/{pid}")]
    assert_nothing_left(bench.pid, record)
    assert set(Path(tempfile.gettempdir()).glob("expertfuse-bench-*")) <= before


def test_sigterm_during_the_served_benchs_triton_start_up_stops_it_at_once(tiny_checkpoint, tmp_path):
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--ckpt", str(tiny_checkpoint), "--eval-limit", "20",
                              "--served", "--repository", str(slow_repository(tmp_path / "repo")), "--server", "bundled",
                              "--out", str(tmp_path / "bench")], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [r for _, r in runs_of(bench.pid) if r.get("server_pid")]:
        assert bench.poll() is None, bench.communicate()
        time.sleep(0.1)
    record = next(r for _, r in runs_of(bench.pid) if r.get("server_pid"))
    time.sleep(1.0)  # Triton is loading the slow model now
    bench.send_signal(signal.SIGTERM)
    out, err = bench.communicate(timeout=30)
    assert bench.returncode == 143 and err.strip() == "stopped by SIGTERM" and "in-process:" not in out
    assert_nothing_left(bench.pid, record, within=2)


def test_a_served_window_of_none_or_too_few_requests_gives_no_figure():
    from bench.measure.served import MIN_WINDOW_REQUESTS, window_figures
    for counts in ([0, 12, 12], [MIN_WINDOW_REQUESTS - 1, 40, 40], []):
        row = window_figures(counts, [2.0] * sum(counts), 1, 0.5)
        assert not row["measured"] and not row["stable"], counts
        assert "throughput" not in row and not any(k.startswith("p") and k.endswith("_ms") for k in row), counts
        assert row["not_measured"].startswith(f"a 0.5 s window completed {min(counts, default=0)} requests")
    row = window_figures([MIN_WINDOW_REQUESTS] * 3, [2.0] * 3 * MIN_WINDOW_REQUESTS, 1, 0.5)
    assert row["measured"] and row["stable"] and row["throughput"] == 2 * MIN_WINDOW_REQUESTS
    assert row["p99_ms"] == 2.0 and "not_measured" not in row


def test_an_interleaved_run_short_of_rounds_is_extended_to_its_cap_then_not_measured():
    from expertfuse.timing import MIN_ROUNDS, interleave
    slow = {name: lambda i: time.sleep(0.01) for name in ("a", "b")}  # 20 ms a round: at most 10 rounds in 0.2 s
    short = interleave(slow, calls_per_block=1, warmup=0, budget_s=0.02, max_s=0.1)
    assert 1 <= short.rounds < MIN_ROUNDS and not short.measured
    assert short.not_measured.startswith(f"{short.rounds} interleaved rounds in ") and "--budget-s" in short.not_measured
    fast = {name: lambda i: None for name in ("a", "b")}
    extended = interleave(fast, calls_per_block=1, warmup=0, budget_s=0.0, max_s=10)
    assert extended.rounds == MIN_ROUNDS and extended.measured and extended.not_measured is None


def test_served_sweep_beside_two_cpu_burners_reports_no_empty_window_as_measured(triton):
    """Two processes spinning on the 2 cores (bounded to 2 minutes, stopped by pid): a window that caught no request
    or too few is remeasured longer, and what is still short says so instead of giving a figure."""
    from bench.measure.served import MIN_WINDOW_REQUESTS
    from bench.measure.timed_images import random_images
    from bench.served_stage import sweep_model
    burners = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 120\n"
                                 "while time.time() < end: pass"]) for _ in range(2)]
    try:
        args = SimpleNamespace(served_batch=1, concurrency=[1, 4], window_s=0.02, client_processes=1, client="threads")
        rows = sweep_model(args, triton.endpoints.grpc, "grpc", "ncl", random_images(32), None, None)
    finally:
        for burner in burners:
            burner.terminate()
            burner.wait(timeout=30)
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row in rows:
        if row["measured"]:
            assert min(row["window_throughputs"]) * row["window_s"] >= MIN_WINDOW_REQUESTS and row["throughput"] > 0
            assert row["requests"] >= 3 * MIN_WINDOW_REQUESTS and row["p99_ms"] >= row["p50_ms"] > 0
        else:
            assert not row["stable"] and "throughput" not in row and "p99_ms" not in row, row
            assert row["window_s"] == pytest.approx(0.02 * 8) and "lengthen --window-s" in row["not_measured"]


def noisy_bench_result(budget_s: float = 4.0) -> dict:
    """A constructed bench result whose fused ensemble's batch-1 cost is too noisy (rounds that vary +-60%), with two
    served places (one UNRELIABLE cost, two points on the same spot) and a served sweep with one point not measured."""
    rng = np.random.default_rng(0)
    blocks = lambda t, spread: [list(t * rng.lognormal(0, spread) * rng.normal(1, 0.01, 3))  # noqa: E731
                                for _ in range(20)]
    timings = {b: Interleaved({f"{n}@onnxruntime-cpu": blocks(t * b, 0.6 if (n, b) == ("ensemble-grouped", 1) else 0)
                               for n, t in (("expert0", 1.0), ("expert1", 1.0), ("ensemble-loop", 3.0),
                                            ("ensemble-grouped", 2.5))}) for b in (1, 64)}
    acc = lambda o, f: {"overall": o, "many": o + 10, "medium": o, "few": f, "agreement": 90.0,  # noqa: E731
                        "ci95": {"overall": [o - 2, o + 2], "few": [f - 5, f + 5]}}
    variants = {"expert0": {"experts": [0], "precision": "fp32", "fusion": "loop", "accuracy": acc(60.0, 20.0)},
                "expert1": {"experts": [1], "precision": "fp32", "fusion": "loop", "accuracy": acc(55.0, 40.0)},
                "ensemble-loop": {"experts": [0, 1], "precision": "fp32", "fusion": "loop", "accuracy": acc(65.0, 45.0)},
                "ensemble-grouped": {"experts": [0, 1], "precision": "fp32", "fusion": "grouped",
                                     "accuracy": acc(65.0, 45.0)}}
    ratios = inprocess_ratios(variants, timings, "onnxruntime-cpu", "expert0")
    points = cost_accuracy(variants, timings, "onnxruntime-cpu", "expert0")
    for name, cost, ci, protocol in (("ncl_expert0", 1.0, 0.0, "grpc"), ("ncl", 1.5, 0.3, "grpc"),
                                     ("ncl_naive", 2.5, 0.05, "grpc"), ("ncl_expert0", 1.0, 0.0, "http"),
                                     ("ncl", 1.5, 0.05, "http"), ("ncl_naive", 2.5, 0.05, "http")):
        c = {"ratio": cost, "ci95": [cost - ci, cost + ci], "rounds": 20, "samples": 200, "reliable": ci / cost <= 0.1}
        points.append({"name": f"{name} over {protocol}", "where": f"triton-{protocol}", "experts": 1, "experts_run": 1.0,
                       "precision": "fp32", **accuracy_columns(acc(60.0 + cost, 30.0)), "cost_b1": c,
                       "cost_small": cost, "cost_large": None, "cost_small_reliable": c["reliable"]})
    mark_pareto(points)
    gains = {"overall": {"points": 5.0, "ci95": [4.0, 6.0]}, "few": {"points": 25.0, "ci95": [15.0, 35.0]}}
    sweep = [{"model": "ncl", "protocol": "grpc", "concurrency": c, "measured": True, "throughput": 50.0 * c,
              "p50_ms": 10.0 * c, "p99_ms": 15.0 * c, "stable": True} for c in (1, 4)]
    sweep.append({"model": "ncl", "protocol": "grpc", "concurrency": 16, "measured": False, "stable": False,
                  "not_measured": "a 8 s window completed 2 requests (at least 5 needed): lengthen --window-s"})
    return {"checkpoint": "ncl.pt", "machine": machine_info(), "single": "expert0", "ratios": ratios, "points": points,
            "decision": decision(points, ratios, "expert0", lambda a, b: gains, budget_s), "inprocess": [],
            "served": {"models": [], "sweep": sweep, "server_models": ["ncl"]}, "p99_budget_ms": 40.0,
            "not_measured": ["in-process batch 256: 3 interleaved rounds in 16.0 s (at least 10 needed): give it a "
                             "longer --budget-s"],
            "evaluation": {"source": "constructed split", "chosen_on": "another split", "shot_rule": "strict"}}


def test_an_unreliable_cost_never_heads_the_decision_nor_sits_on_the_pareto_front(tmp_path):
    result = noisy_bench_result()
    d, by_name = result["decision"], {p["name"]: p for p in result["points"]}
    grouped = by_name["ensemble-grouped"]
    assert not grouped["cost_b1"]["reliable"] and grouped["cost_b64"]["reliable"]
    assert not grouped["pareto_cost_small_overall"] and grouped["pareto_cost_large_overall"]
    assert not by_name["ncl over grpc"]["pareto_cost_small_overall"] and by_name["ncl over http"]["pareto_cost_small_overall"]
    assert not d["reliable"] and d["noisy_batches"] == [1] and "UNRELIABLE" not in d["sentence"]
    assert d["sentence"].startswith("The ensemble (ensemble-grouped) buys +5.0 [+4.0, +6.0] points overall, +25.0 "
                                    "[+15.0, +35.0] on few-shot classes, for 2.")
    assert "the cost at batch 64, against the best single expert (expert0). Its cost at batch 1 (" in d["sentence"]
    assert d["sentence"].endswith("was too noisy to state (95% interval wider than +-10%): rerun python -m bench with "
                                  "a --budget-s longer than 4 s (4x the time halves the interval), on a quieter machine.")
    write_all(result, tmp_path)
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert summary[2] == d["sentence"] and summary[4].startswith("Machine: ") and summary[6] == "## Cost and accuracy"
    table = [line for line in summary if line.startswith("| ") and "onnxruntime-cpu" in line]
    assert table[0].startswith("| 1 | expert0 * | onnxruntime-cpu | 1 | fp32 | 60.0 [58.0, 62.0] |")
    assert next(line for line in table if "ensemble-grouped" in line).startswith("| 4 | ensemble-grouped |")


def test_served_rows_not_measured_are_named_with_their_reason_and_left_out_of_tables_and_plots(tmp_path):
    from bench.report import served_curves_figure
    result = noisy_bench_result()
    write_all(result, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    section = summary[summary.index("## Not measured"):].split("\n## ")[0]
    assert "- in-process batch 256: 3 interleaved rounds in 16.0 s" in section
    assert "- served ncl over grpc at concurrency 16: a 8 s window completed 2 requests" in section
    assert "| ncl | grpc | 4 | 200.0 |" in summary and "| ncl | grpc | 16 |" not in summary
    assert "- ncl over grpc: 50.0 img/s at concurrency 1 (p99 15.00 ms)" in summary  # at 4, p99 60 ms > 40 ms
    fig = served_curves_figure(result["served"]["sweep"], 40.0)
    curves = [line for line in fig.axes[0].lines if line.get_label() == "ncl / grpc"]
    assert len(curves) == 1 and list(curves[0].get_xdata()) == [50.0, 200.0]
    budget = [line for line in fig.axes[0].lines if line.get_label() == "p99 budget 40 ms"]
    assert len(budget) == 1 and list(budget[0].get_ydata()) == [40.0, 40.0]


def test_client_bound_served_points_are_ringed_on_the_latency_plot():
    from bench.report import served_curves_figure
    sweep = [{"model": "ncl", "protocol": "grpc", "concurrency": c, "throughput": t, "p99_ms": p, "measured": True,
              "client_bound": c == 16} for c, t, p in ((1, 50.0, 15.0), (16, 300.0, 80.0))]
    ax = served_curves_figure(sweep).axes[0]
    ringed = [c for c in ax.collections if c.get_label().startswith("client-bound")]
    assert len(ringed) == 1 and ringed[0].get_offsets().tolist() == [[300.0, 80.0]]


def test_cost_accuracy_plot_bars_intervals_hollows_unreliable_points_and_numbers_them_without_overlap():
    from matplotlib.container import ErrorbarContainer
    from matplotlib.text import Text
    from bench.report import cost_accuracy_figure
    result = noisy_bench_result()
    points = result["points"]
    fig = cost_accuracy_figure(points)
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels[:3]] == ["in-process, batch 1 (latency)", "in-process, batch 64 (1 / throughput)",
                                                     "served, batch 1, concurrency 1"]
    assert len(panels) == 6  # overall and few-shot
    grouped = next(p for p in points if p["name"] == "ensemble-grouped")
    for ax in panels:
        numbers = [t for t in ax.texts if t.get_gid() == "number"]
        boxes = [Text.get_window_extent(t, renderer) for t in numbers]
        served = ax.get_title().startswith("served")
        assert sorted(int(t.get_text()) for t in numbers) == list(range(5, 11) if served else range(1, 5))
        assert not [(a.get_text(), b.get_text()) for i, (a, box) in enumerate(zip(numbers, boxes))
                    for b, other in zip(numbers[i + 1:], boxes[i + 1:]) if box.overlaps(other)], ax.get_title()
        assert all(ax.get_window_extent(renderer).contains(b.x0, b.y0) for b in boxes)
        assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)
        hollow = [c for c in ax.collections if (c.get_gid() or "").startswith("unreliable")]
        assert all(len(c.get_facecolor()) == 0 or not c.get_facecolor()[:, 3].any() for c in hollow)
        fronts = [line for line in ax.lines if (line.get_gid() or "").startswith("pareto")]
        if ax.get_title() == "in-process, batch 1 (latency)":
            assert [list(c.get_offsets()[0]) for c in hollow] == [[grouped["cost_small"], grouped[ax.get_ylabel()[6:-4]]]]
            assert all(grouped["cost_small"] not in line.get_xdata() for line in fronts)
        if served:
            assert {line.get_gid() for line in fronts} == {"pareto triton-http", "pareto triton-grpc"}
            assert [c.get_gid() for c in hollow] == ["unreliable triton-grpc"]
    key = next(t for t in fig.texts + [t for ax in fig.axes for t in ax.texts] if t.get_gid() == "key")
    assert key.get_text().splitlines()[3] == " 4  ensemble-grouped (onnxruntime-cpu)"
    assert not any(key.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in panels)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_bench_report_rewrites_an_earlier_runs_report_from_its_bench_json(tmp_path):
    """Written by earlier code: no reliability flags, the Pareto front with an UNRELIABLE cost, its sentence stating it,
    a served point with an empty window passing as 0 img/s. Today's report derives what it reads, measuring nothing."""
    from bench.report import main as report_main
    result = noisy_bench_result()
    for p in result["points"]:
        for key in [k for k in p if k.endswith("_reliable") or k.startswith("pareto_")]:
            del p[key]
        p["pareto_cost_small_overall"] = True
    result["decision"] = {"gain_ci95": {"overall": [4.0, 6.0], "few": [15.0, 35.0]}, "reliable": False,
                          "sentence": "The ensemble ... 2.5x UNRELIABLE"}
    result["settings"] = {"budget_s": "4.0", "window_s": "0.5"}
    result["served"]["sweep"] = [{"model": "ncl", "protocol": "grpc", "concurrency": 1, "batch": 1, "throughput": 4.0,
                                  "window_throughputs": [0.0, 6.0, 6.0], "p50_ms": 1.0, "p99_ms": 2.0,
                                  "server_queue_ms": 0.0, "stable": False}]
    (tmp_path / "bench.json").write_text(json.dumps(result, default=str))
    report_main([str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["decision"]["sentence"] == noisy_bench_result()["decision"]["sentence"]
    grouped = next(p for p in saved["points"] if p["name"] == "ensemble-grouped")
    assert not grouped["pareto_cost_small_overall"] and grouped["pareto_cost_large_overall"]
    row = saved["served"]["sweep"][0]
    assert not row["measured"] and "throughput" not in row and "p99_ms" not in row and "server_queue_ms" not in row
    summary = (tmp_path / "summary.md").read_text()
    assert "- served ncl over grpc at concurrency 1: a 0.5 s window completed 0 requests" in summary
    assert saved["plots"] == ["cost_accuracy.png"]
    del result["evaluation"]["chosen_on"]  # a run whose best expert was picked on the split it is scored on
    (tmp_path / "bench.json").write_text(json.dumps(result, default=str))
    with pytest.raises(UserError, match="predates the calibration split"):
        report_main([str(tmp_path)])


def test_report_names_files_without_machine_paths(tmp_path):
    run = tmp_path / "out"
    assert report_name(tmp_path / "train" / "ncl.pt", run) == "ncl.pt"
    assert report_name(run / "plots" / "a.png", run) == "plots/a.png" and report_name(run, run) == "."
    assert report_name(Path("runs/ncl/ncl.pt"), run) == "runs/ncl/ncl.pt"  # as typed, relative to where it ran
    from argparse import Namespace
    from expertfuse.files import report_settings
    flags = Namespace(data_root=str(tmp_path / "cifar10"), ckpt=tmp_path / "ncl.pt", out=run, budget_s=8.0, model=None)
    assert report_settings(flags, run) == {"data_root": "cifar10", "ckpt": "ncl.pt", "out": ".", "budget_s": "8.0",
                                          "model": "None"}  # --data-root is text, not a Path: named all the same
