"""Early exit: threshold 1.0 is the full ensemble, 0 the first expert, per sample inside one batch; served alike."""
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import early_exit as ee
from bench.inprocess import References, gate_and_score, make_runner, repository_variants
from export import gate
from export.job import job_for
from export.labelled import EvalSet, LabelledData, load_eval_set
from export.graph import reference_logits
from export.onnx import export_graph, onnx_file
from serve.server import TritonServer
from tests.helpers import run_module

ORDER = [2, 0, 1]


@pytest.fixture(scope="module")
def experts(tiny_checkpoint, tmp_path_factory):
    """(job, per-expert ONNX graphs in ORDER, fused loop ensemble session)."""
    job = job_for(tiny_checkpoint)
    work = tmp_path_factory.mktemp("experts")
    paths = [onnx_file(export_graph(replace(job, opts=replace(job.opts, experts=(k,))), "loop", work / f"e{k}", 18))
             for k in ORDER]
    full = ort.InferenceSession(str(onnx_file(export_graph(job, "loop", work / "full", 18))), providers=["CPUExecutionProvider"])
    return job, ee.load_experts(paths), full


def mixed_batch(job) -> np.ndarray:
    """Real-looking gratings (the model is sure of many) and random pixels (unsure), interleaved."""
    sets = gate.test_images(job, 8)
    return torch.stack([t for pair in zip(sets["real-looking"], sets["random"]) for t in pair]).numpy()


def run(model, images):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, runs = sess.run(["logits", "experts_run"], {"image": images})
    return logits, runs[:, 0]


@pytest.mark.parametrize("batch", [1, 16])
def test_threshold_one_is_the_full_ensemble_and_zero_the_first_expert(experts, batch):
    job, models, full = experts
    images = mixed_batch(job)[:batch]
    logits, runs = run(ee.compose(models, 1.0), images)
    ensemble = full.run(["logits"], {"image": images})[0]
    np.testing.assert_allclose(logits, ensemble, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(1) == ensemble.argmax(1)).all() and (runs == 3).all()
    logits, runs = run(ee.compose(models, 0.0), images)
    first = reference_logits(job.model, (ORDER[0],), torch.from_numpy(images), "uint8-nhwc").numpy()
    np.testing.assert_allclose(logits, first, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == first.argmax(1)).all() and (runs == 1).all()


def test_a_mixed_batch_exits_per_sample(experts):
    job, models, _ = experts
    images = mixed_batch(job)
    per_expert = torch.stack([reference_logits(job.model, (k,), torch.from_numpy(images), "uint8-nhwc")
                              for k in range(3)], 1).numpy()
    shifted = np.exp(per_expert[:, ORDER[0]] - per_expert[:, ORDER[0]].max(1, keepdims=True))
    threshold = float(np.median((shifted / shifted.sum(1, keepdims=True)).max(1)))  # about half leave after one
    logits, runs = run(ee.compose(models, threshold), images)
    expected, expected_runs = ee.simulate(per_expert, ORDER, threshold)
    assert set(runs.tolist()) > {1}, "some images go on, some leave"
    np.testing.assert_array_equal(runs, expected_runs)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_auto_threshold_stays_within_tolerance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    logits = rng.normal(size=(200, 3, 4)) + 3.0 * np.eye(4)[labels][:, None] * rng.random((200, 3, 1))
    data = EvalSet(np.zeros((200, 1, 1, 3), np.uint8), labels, [200, 100, 30, 5], "strict", "constructed")
    threshold, grid = ee.choose_threshold(logits, data, [0, 1, 2])
    chosen = next(r for r in grid if r["threshold"] == threshold)
    full = next(r for r in grid if r["threshold"] == 1.0)
    assert chosen["ok"] and not any(r["ok"] for r in grid if r["threshold"] < threshold)
    assert chosen["accuracy"]["overall"] >= full["accuracy"]["overall"] - 0.2 and full["mean_experts"] == 3.0


@pytest.fixture(scope="module")
def early_exit_repository(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("early-exit") / "repo"
    run_module("export.onnx", "--ckpt", str(tiny_checkpoint), "--out", str(repo), "--early-exit", "0.5", "--max-batch", "16")
    return repo


def test_bench_runs_the_repository_early_exit_model_against_its_own_reference(tiny_checkpoint, early_exit_repository):
    job = job_for(tiny_checkpoint)
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData(limit=40))
    refs = References.build(job.model, data, gate_images=4)
    [variant] = repository_variants(early_exit_repository, job.model.num_experts)
    assert variant.name == "early-exit:ncl_early_exit" and variant.early_exit.threshold == 0.5
    verdict = gate_and_score(make_runner("onnxruntime-cpu", job, variant, early_exit_repository), variant.experts,
                             variant.precision, refs, data, early_exit=variant.early_exit)
    assert "accuracy" in verdict and verdict["parity_labelled"]["ok"]


def test_served_early_exit_model_equals_onnxruntime(tiny_checkpoint, early_exit_repository):
    import tritonclient.grpc as grpcclient
    repo = early_exit_repository
    images = mixed_batch(job_for(tiny_checkpoint))
    local = ort.InferenceSession(str(repo / "ncl_early_exit" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected_logits, expected_runs = local.run(["logits", "experts_run"], {"image": images})
    with TritonServer(repo, "bundled", ready_timeout=120) as server:
        client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        try:
            request = grpcclient.InferInput("image", list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            result = client.infer("ncl_early_exit", [request], outputs=[grpcclient.InferRequestedOutput("logits"),
                                                                        grpcclient.InferRequestedOutput("experts_run")])
        finally:
            client.close()
    np.testing.assert_array_equal(result.as_numpy("experts_run"), expected_runs)
    np.testing.assert_allclose(result.as_numpy("logits"), expected_logits, rtol=1e-6, atol=1e-6)
