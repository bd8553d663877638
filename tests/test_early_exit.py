"""Early exit: threshold 1.0 is the full ensemble, 0 the first expert, per sample inside one batch; served alike."""
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from expertfuse.errors import UserError
from export import early_exit as ee
from bench.measure.inprocess import References, gate_and_score, make_runner, repository_variants
from export import gate
from export.job import job_for
from export.data_flags import LabelledData
from export.labelled import EvalSet, difference_lower_bounds, load_eval_set
from export.graph import reference_logits
from export.onnx import export_graph, onnx_file
from serve.server import TritonServer
from tests.helpers import export_cli

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


def test_per_class_thresholds_exit_per_sample_as_simulated(experts):
    job, models, _ = experts
    images = mixed_batch(job)
    per_expert = torch.stack([reference_logits(job.model, (k,), torch.from_numpy(images), "uint8-nhwc")
                              for k in range(3)], 1).numpy()
    classes = per_expert.shape[-1]
    limit = np.where(np.arange(classes) % 2 == 0, 0.0, 1.0).astype(np.float32)  # even classes leave at once, odd never
    logits, runs = run(ee.compose(models, limit), images)
    expected, expected_runs = ee.simulate(per_expert, ORDER, limit)
    first = per_expert[:, ORDER[0]].argmax(1)
    assert set(runs.tolist()) == {1, 3} and (runs[first % 2 == 0] == 1).all()
    np.testing.assert_array_equal(runs, expected_runs)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def tail_trap() -> tuple[np.ndarray, EvalSet]:
    """Logits [400, 3, 4] where the first expert is as sure of every image, but calls the medium class's images the
    few-shot class: a global threshold must send every image on, a per-group one only those predicted few-shot."""
    labels = np.repeat(np.arange(4), 100)
    logits = np.zeros((400, 3, 4))
    logits[np.arange(400), :, labels] = 5.0
    medium = labels == 2
    logits[medium, 0] = 0.0
    logits[medium, 0, 3] = 5.0  # expert 0: the medium class's images look few-shot
    logits[medium, 1:, 2] = 10.0
    return logits, EvalSet(np.zeros((400, 1, 1, 3), np.uint8), labels, [200, 150, 50, 5], "strict", "constructed")


def test_auto_protects_the_tail_cheaper_than_any_global_threshold():
    logits, data = tail_trap()
    rule, record = ee.choose_exit(logits, data, [0, 1, 2])
    chosen, best_global, full = record["chosen"], record["cheapest_global"], record["full_ensemble"]
    assert chosen["ok"] and chosen["calibration"]["overall"] >= full["overall"] - 0.2
    assert chosen["calibration"]["few"] >= full["few"] - 0.2 and record["tail_group"] == "few"
    assert chosen["calibration_mean_experts"] < best_global["calibration_mean_experts"] - 0.2
    assert rule.few > rule.many and str(rule) == chosen["threshold"] and "experts per image" in record["why"]
    out, runs = ee.simulate(logits, [0, 1, 2], rule.per_class(data.train_counts, data.shot_rule))
    assert runs.mean() == pytest.approx(chosen["calibration_mean_experts"])  # the fast scan agrees with simulate
    assert not any(r["ok"] for r in record["global_curve"] if r["calibration_mean_experts"] < best_global["calibration_mean_experts"])


def test_the_tail_is_the_rarest_group_the_split_has_images_of():
    logits, data = tail_trap()  # classes 0 and 1 many, 2 medium, 3 few
    assert ee.tail_group(data) == "few"
    keep = data.labels != 3  # a split without an image of the few-shot class: the medium-shot classes are its tail
    without = EvalSet(data.pixels[keep], data.labels[keep], data.train_counts, "strict", "constructed")
    rule, record = ee.choose_exit(logits[keep], without, [0, 1, 2])
    assert record["tail_group"] == "medium" and "on medium-shot classes" in record["why"]


def lucky_trap(per_class: int) -> tuple[np.ndarray, EvalSet]:
    """Logits [8 * per_class, 3, 8]: the first expert is as sure of every image and as accurate as the full
    ensemble (80%), but right on other images: a fifth of them it gets right and the ensemble wrong, a fifth the
    other way round. Stopping after it costs nothing in accuracy on this split, by the luck of the draw: on other
    images the two differ by points either way. After two experts the mean predicts what the ensemble does."""
    labels = np.repeat(np.arange(8), per_class)
    n, wrong = len(labels), (labels + 1) % 8
    kind = np.arange(n) % 20 // 4  # per class: 0 first expert only right, 1 ensemble only right, 2-4 both right
    first = np.where(kind == 1, wrong, labels)
    others = np.where(kind == 0, wrong, labels)
    logits = np.zeros((n, 3, 8))
    logits[np.arange(n), 0, first] = 5.0
    logits[np.arange(n), 1, others] = logits[np.arange(n), 2, others] = 20.0
    counts = [400, 300, 200, 150, 60, 40, 15, 10]  # strict rule: many 0-3, medium 4-5, few 6-7
    return logits, EvalSet(np.zeros((n, 1, 1, 3), np.uint8), labels, counts, "strict", "constructed")


def test_auto_refuses_a_setting_whose_match_with_the_ensemble_is_luck():
    logits, data = lucky_trap(per_class=100)
    point, _ = ee.choose_exit(logits, data, [0, 1, 2], confidence=0.5)  # the point estimate: first expert only
    assert ee.Stages(logits, [0, 1, 2], data).score(point)["mean_experts"] == 1.0
    rule, record = ee.choose_exit(logits, data, [0, 1, 2])  # 95%: its 0.0 difference could be -3.7 points
    chosen = record["chosen"]
    assert chosen["calibration_mean_experts"] == 2.0 and record["confidence"] == 0.95
    assert chosen["calibration_lower_bound"]["overall"] == 0.0 and "by the 95% lower bound" in record["why"]
    lucky = next(r for r in record["global_curve"] if r["threshold"] == "0")
    assert not lucky["ok"] and lucky["calibration_lower_bound"]["overall"] < -1.0
    assert lucky["calibration"]["overall"] == record["full_ensemble"]["overall"]


def test_difference_lower_bounds_cover_the_true_difference_as_often_as_stated():
    """Two classifiers right on the same easy images, the second more often in three classes: on 2,000 random
    splits the 95% lower bound of (first - second) lies below the true difference in about 95% of them, overall
    (sample-weighted) and in a group of two classes weighed equally (the strict rule)."""
    rng = np.random.default_rng(0)
    per_class = np.array([300, 200, 400, 400])
    labels = np.repeat(np.arange(4), per_class)
    data = EvalSet(np.zeros((len(labels), 1, 1, 3), np.uint8), labels, [500, 400, 15, 10], "strict", "constructed")
    first, second = np.array([0.8, 0.7, 0.5, 0.3]), np.array([0.8, 0.75, 0.6, 0.38])
    truth = {"overall": 100 * float((first - second) @ per_class / per_class.sum()),
             "few": 100 * float((first - second)[2:].mean())}
    covered = {"overall": 0, "few": 0}
    for _ in range(2000):
        u = rng.random(len(labels))
        bounds = difference_lower_bounds(u < first[labels], u < second[labels], data, z=1.645)
        for group in covered:
            covered[group] += bounds[group] <= truth[group]
    assert all(0.92 < n / 2000 < 0.975 for n in covered.values()), covered  # 0.929-0.955 over three seeds
    same = difference_lower_bounds(labels == 0, labels == 0, data, z=1.645)
    assert same == {"overall": 0.0, "many": 0.0, "few": 0.0}  # identical predictions: nothing to doubt
    one_each = EvalSet(data.pixels[:2], np.array([2, 3]), data.train_counts, "strict", "constructed")
    worse = difference_lower_bounds(np.array([False, False]), np.array([True, True]), one_each, z=1.645)
    assert worse["few"] < -100  # one image per class: no spread to pool, the largest is assumed, not none


def test_exit_rules_parse_and_refuse_in_one_line():
    assert ee.parse_threshold("0.9") == ee.ExitRule(0.9, 0.9, 0.9) and str(ee.ExitRule(0.9, 0.9, 0.9)) == "0.9"
    assert str(ee.parse_threshold("0.8,0.95,1")) == "0.8,0.95,1"
    assert ee.parse_threshold("auto") == ee.Auto(0.2, 0.95) and ee.parse_threshold("auto:0.5") == ee.Auto(0.5, 0.95)
    assert ee.parse_threshold("auto:0.3:0.5") == ee.Auto(0.3, 0.5)  # 0.5: the point estimate
    for bad in ("2", "0.5,0.6", "x", "auto:-1", "auto:", "auto:0.2:1", "auto:0.2:0.4", "auto:0.2:0.9:1", "auto:nan",
                "auto:inf"):
        with pytest.raises(UserError):
            ee.parse_threshold(bad)


@pytest.fixture(scope="module")
def early_exit_repository(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("early-exit") / "repo"
    export_cli("--ckpt", str(tiny_checkpoint), "--out", str(repo), "--early-exit", "0.5", "--max-batch", "16")
    return repo


def test_bench_runs_the_repository_early_exit_model_against_its_own_reference(tiny_checkpoint, early_exit_repository):
    job = job_for(tiny_checkpoint)
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData(limit=40))
    refs = References.build(job.model, data, gate_images=4)
    [variant] = repository_variants(early_exit_repository, job.model.num_experts)
    assert variant.name == "early-exit:ncl_early_exit" and variant.early_exit.threshold == "0.5"
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


def test_costs_are_timed_on_evaluation_images_that_exit_as_the_split_does(tiny_checkpoint, early_exit_repository):
    """Random pixels exit unlike real images (on the demo checkpoint all after the first expert, on this tiny model
    none early), so an early-exit model timed on them is timed doing other work than it does: the bench times every
    variant on a fixed sample of the evaluation split, and reports the experts the model ran on that sample."""
    from bench.measure.inprocess import run_inprocess
    from bench.measure.timed_images import random_images, timing_batches
    job = job_for(tiny_checkpoint)
    data = load_eval_set(job.checkpoint.data, job.spec, LabelledData(limit=120))
    refs = References.build(job.model, data, gate_images=4)
    [variant] = repository_variants(early_exit_repository, job.model.num_experts)
    session = ort.InferenceSession(str(early_exit_repository / "ncl_early_exit" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    on_random = session.run(["experts_run"], {"image": random_images(32, 64)})[0].mean()
    rows, _ = run_inprocess(job, ["onnxruntime-cpu"], [variant], refs, data, [1, 8], 0.2, early_exit_repository,
                            log=lambda *a: None)
    for batch in (1, 8):
        timed = timing_batches(data.pixels, batch)
        pool = {img.tobytes() for img in data.pixels}
        assert all(img.tobytes() in pool for b in timed for img in b) and all(len(b) == batch for b in timed)
        ran = np.concatenate([session.run(["experts_run"], {"image": b})[0][:, 0] for b in timed])
        assert abs(ran.mean() - on_random) > 0.3, (ran.mean(), on_random)
        assert rows[0]["timing"][batch]["experts_run_timed"] == pytest.approx(ran.mean())


def test_tune_refuses_an_early_exit_model_it_could_only_drive_with_random_images(early_exit_repository):
    from bench.tune import check_model
    with pytest.raises(UserError, match="ncl_early_exit is an early-exit model: its cost depends on the images"):
        check_model(early_exit_repository, "ncl_early_exit", [1])
