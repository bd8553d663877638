import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.onnx._internal.exporter._registration import ONNXRegistry

from expertfuse.contract import ModelMetadata
from export.graph import reference_logits
from export.job import LoadedCheckpoint, job_for
from export.onnx import written_opset
from export.torchlib import torchlib_registry
from serve.repository import parse
from tests.helpers import export_both_fusions, export_cli, in_process, make_checkpoint, ort_logits, run_module
from train.checkpoint import load_model
from train.data.synthetic import synthesize


def test_cli_exports_a_3_expert_resnet32_ncl_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ncl.pt", arch="resnet32")
    proc = export_cli("--ckpt", str(ckpt), "--model-repository", str(tmp_path / "repo"), "--fusion",
                      "grouped", "--max-batch", "16", "--instance-kind", "gpu", "--gpus", "0,1", "--preferred-batch-sizes", "8,16",
                      "--version-policy", "all", "--ort-threads", "2", "--ort-tensorrt", "--ort-tensorrt-fp16",
                      "--ort-tensorrt-cache", "/trt-cache")
    assert "parity real-looking batch   16" in proc.stdout and "wrote" in proc.stdout
    model_dir = tmp_path / "repo" / "ncl"
    cfg = parse((model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16 and cfg.input[0].dims == [32, 32, 3]
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU and list(cfg.instance_group[0].gpus) == [0, 1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16] and cfg.version_policy.HasField("all")
    accelerator = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and dict(accelerator.parameters) == {
        "precision_mode": "FP16", "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/trt-cache"}
    assert cfg.parameters["intra_op_thread_count"].string_value == "2"
    assert cfg.output[0].label_filename == "labels.txt" and (model_dir / "labels.txt").read_text().split()[9] == "class9"
    onnx.checker.check_model(str(model_dir / "1" / "model.onnx"), full_check=True)
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)] and proto.ir_version == 8  # oldest IR for opset 18
    meta = ModelMetadata.from_properties({p.key: p.value for p in proto.metadata_props})
    assert meta.fusion == "grouped" and meta.experts == [0, 1, 2] and meta.classes[3] == "class3"
    assert len(meta.checkpoint_sha256) == 64 and meta.input_size == 32 and meta.method == "ncl"
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert ModelMetadata.from_properties(params, meta.classes) == meta  # one key scheme: expertfuse_<field>
    report = json.loads((model_dir / "1" / "export_report.json").read_text())
    assert report["opset"] == written_opset(model_dir / "1" / "model.onnx") == 18 and "onnx.checker passed (opset 18)" in proc.stdout
    model, _ = load_model(ckpt)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    ref = reference_logits(model, (0, 1, 2), images, "uint8-nhwc").numpy()
    assert np.abs(ort_logits(model_dir / "1" / "model.onnx", images.numpy()) - ref).max() <= 1e-4


@pytest.mark.parametrize("spec", [dict(), dict(shortcut="B", shared_stages=2, head="cosine", head_scale=16)],
                         ids=["separate", "shared-trunk"])
def test_loop_and_grouped_agree_with_the_reference_in_onnxruntime(tmp_path, spec):
    job = job_for(make_checkpoint(tmp_path / "m.pt", **spec), probs=True, expert_logits=True, max_batch=8)
    out = export_both_fusions(job, tmp_path, ("probs", "expert_logits"), batch=9)
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-5) and out["expert_logits"].shape == (9, 3, 10)


def test_single_expert_and_float_input_paths(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--experts", "1", "--fusion", "loop",
               "--max-batch", "8")
    export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--experts", "1", "--fusion", "grouped",
               "--input", "float-nchw", "--name", "float", "--max-batch", "8")
    model, _ = load_model(ckpt)
    pixels = np.random.RandomState(2).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    uint8_out = ort_logits(tmp_path / "repo" / "ncl_expert1" / "1" / "model.onnx", pixels)
    float_out = ort_logits(tmp_path / "repo" / "float" / "1" / "model.onnx",
                           np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).astype(np.float32))
    assert np.abs(uint8_out - float_out).max() <= 1e-4
    ref = reference_logits(model, (1,), torch.from_numpy(pixels), "uint8-nhwc").numpy()
    assert np.abs(uint8_out - ref).max() <= 1e-4
    cfg = parse((tmp_path / "repo" / "float" / "config.pbtxt").read_text())
    assert cfg.input[0].data_type == 11 and cfg.input[0].dims == [3, 32, 32]  # TYPE_FP32, NCHW


def test_fp16_graph_keeps_fp32_io_and_agrees(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    proc = export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fp16", "--fusion", "grouped",
                      "--max-batch", "8")
    assert "batch  400" in proc.stdout
    proto = onnx.load(str(tmp_path / "repo" / "ncl_fp16" / "1" / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def test_reexport_adds_a_version_and_overwrite_replaces(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=1)
    repo = tmp_path / "repo"

    def export_and_list(*extra):
        export_cli("--ckpt", str(ckpt), "--out", str(repo), "--fusion", "loop", "--max-batch", "4", *extra)
        return sorted(p.name for p in (repo / "ncl").iterdir() if p.is_dir())
    assert export_and_list() == ["1"]
    builds = torchlib_registry.cache_info().misses
    assert export_and_list() == ["1", "2"]
    # the second export of this process reused torch.onnx's torchlib registry, wrote the same graph, and left
    # torch's own registry builder in place
    assert torchlib_registry.cache_info().misses == builds
    assert onnx.load(str(repo / "ncl" / "1" / "model.onnx")).graph == onnx.load(str(repo / "ncl" / "2" / "model.onnx")).graph
    assert ONNXRegistry.__dict__["from_torchlib"].__func__.__module__ == ONNXRegistry.__module__
    assert export_and_list("--overwrite") == ["1"]


def run_export(module: str, *argv: str) -> tuple[int, str, str]:
    """Run an export entry point in this process through the one CLI runner: (exit code, stdout, stderr)."""
    main = getattr(__import__(f"export.{module}", fromlist=["_"]), f"export_{module}")
    result = in_process(main, argv, check=False)
    return result.returncode, result.stdout, result.stderr


def test_bad_arguments_are_refused_before_any_export_work(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=2)
    repo = tmp_path / "repo"
    (tmp_path / "not-a-checkpoint.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    cases = [(["--ckpt", str(tmp_path / "missing.pt")], "checkpoint not found"),
             (["--ckpt", str(tmp_path / "not-a-checkpoint.pt")], "checkpoint"),
             (["--ckpt", str(ckpt), "--experts", "0,5"], "the checkpoint has experts 0..1"),
             (["--ckpt", str(ckpt), "--out", str(tmp_path / "file" / "repo")], "file" + " is a file, not a folder"),
             (["--ckpt", str(ckpt), "--out", str(tmp_path / "file")], "it is a file, not a folder"),
             (["--ckpt", str(ckpt), "--name", "../evil"], "cannot be served by Triton"),
             (["--ckpt", str(ckpt), "--name", "a b"], "cannot be served by Triton"),
             (["--ckpt", str(ckpt), "--opset", "5"], "--opset 5: torch.onnx's exporter writes opsets 18.."),
             (["--ckpt", str(ckpt), "--max-batch", "0"], "--max-batch must be at least 1"),
             (["--ckpt", str(ckpt), "--instance-count", "0"], "--instance-count must be at least 1"),
             (["--ckpt", str(ckpt), "--parity-factor", "-1"], "--parity-factor must be 0 or more"),
             (["--ckpt", str(ckpt), "--fp16", "--parity-factor", "4"], "--parity-factor judges FP32 exports"),
             (["--ckpt", str(ckpt), "--preferred-batch-sizes", "2,8"], "must lie in 1..--max-batch 4"),
             (["--ckpt", str(ckpt), "--instance-kind", "cpu", "--ort-tensorrt"], "GPU instances only"),
             (["--ckpt", str(ckpt), "--instance-kind", "cpu", "--gpus", "0"], "GPU instances only"),
             (["--ckpt", str(ckpt), "--naive-ensemble", "--probs"], "--naive-ensemble serves logits only")]
    for args, message in cases:
        code, out, err = run_export("onnx", "--fusion", "grouped", "--max-batch", "4", "--out", str(repo), *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert out == "", (args, out)  # refused before the export started (it prints its first line then)
    code, _, err = run_export("onnx", "--ckpt", str(ckpt), "--version-policy", "newest")
    assert code == 2 and "version policy must be latest:N" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created: no repository, no staging folder


def test_parity_failure_writes_nothing_and_exits_1(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=2)
    repo = tmp_path / "repo"
    export_cli("--ckpt", str(ckpt), "--out", str(repo), "--fusion", "loop", "--max-batch", "4")
    before = sorted(tmp_path.rglob("*"))
    proc = export_cli("--ckpt", str(ckpt), "--out", str(repo), "--fusion", "grouped", "--max-batch", "4",
                      "--parity-factor", "0", check=False)
    assert proc.returncode == 1 and "disagrees with PyTorch" in proc.stderr and "nothing written" in proc.stderr
    assert "<= 0 x PyTorch float32's own error" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no new version, no staging leftovers


def test_large_logits_export_when_their_relative_error_is_tiny(tmp_path):
    """Issue 12.6: logits near 1e5 differ by ~1e-2 in absolute terms (float32 rounding), 1e-7 relative."""
    ckpt = make_checkpoint(tmp_path / "m.pt")
    payload = torch.load(ckpt, weights_only=True)
    for key, value in payload["state_dict"].items():
        if ".head." in key:
            value.mul_(1e5)
    torch.save(payload, ckpt)
    proc = export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fusion", "grouped",
                      "--max-batch", "8")
    report = json.loads((tmp_path / "repo" / "ncl" / "1" / "export_report.json").read_text())
    worst = max(row["max_abs_diff"] for row in report["parity"])
    model, _ = load_model(ckpt)
    images = torch.from_numpy(synthesize([8], seed=0)[0])
    assert reference_logits(model, (0, 1, 2), images, "uint8-nhwc").abs().max() > 1e4
    assert worst > 1e-4, "the old absolute gate (max|diff| <= 1e-4) would have refused this model"
    assert all(row["ok"] for row in report["parity"]) and "wrote" in proc.stdout


def test_a_killed_export_leaves_a_staging_folder_that_the_next_export_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from tests.helpers import REPO
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=1)
    repo = tmp_path / "repo"
    args = ["--ckpt", str(ckpt), "--out", str(repo), "--fusion", "loop", "--max-batch", "4"]
    victim = subprocess.Popen([sys.executable, "-m", "export.onnx", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".repo-staging-*")) and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert [p.name.split("-")[2] for p in tmp_path.glob(".repo-staging-*")] == [str(victim.pid)]
    export_cli(*args)
    assert not list(tmp_path.glob(".repo-staging-*")) and (repo / "ncl" / "1" / "model.onnx").is_file()


def test_trt_export_explains_what_is_missing(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    proc = run_module("export.trt", "--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), check=False)
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:
        pytest.skip("TensorRT and a GPU are present: the build itself runs in test_trt_build")
    assert proc.returncode == 2 and "pip install expertfuse[trt] on a machine with an NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    proc = run_module("export.trt", "--ckpt", str(ckpt), "--min-batch", "9", "--opt-batch", "4", check=False)
    assert proc.returncode == 2 and "--min-batch <= --opt-batch" in proc.stderr


def test_trt_build():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install expertfuse[trt] on an NVIDIA GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from export.trt import export_trt
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "m.pt")
        model_dir = export_trt(["--ckpt", str(ckpt), "--out", str(Path(tmp) / "repo"), "--max-batch", "16", "--opt-batch", "8"])
        assert (model_dir / "1" / "model.plan").is_file() and (model_dir / "1" / "build.json").is_file()
        assert parse((model_dir / "config.pbtxt").read_text()).max_batch_size == 16


def test_large_models_use_the_external_data_layout(tmp_path, monkeypatch):
    """Over 2 GB, the artifact is the folder model.onnx/ holding model.onnx plus its weights (forced here)."""
    import export.onnx as export_onnx
    from serve.bundled import runtime_repository
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_BYTES", 0)
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=2)
    model_dir = export_onnx.export_onnx(["--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fusion", "grouped",
                                         "--max-batch", "4"])
    artifact = model_dir / "1" / "model.onnx"
    assert artifact.is_dir() and (artifact / "model.onnx").is_file() and len(list(artifact.iterdir())) >= 2
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model, _ = load_model(ckpt)
    ref = reference_logits(model, (0, 1), torch.from_numpy(images), "uint8-nhwc").numpy()
    assert np.abs(ort_logits(artifact / "model.onnx", images) - ref).max() <= 1e-4
    runtime_repository(tmp_path / "repo", tmp_path / "runtime")
    assert (tmp_path / "runtime" / "ncl" / "1" / "model.onnx" / "model.onnx").is_file()


def test_auto_fusion_keeps_the_candidate_fastest_over_both_batch_sizes():
    import time
    from expertfuse.timing import pick_fastest
    delays = {"loop": {1: 0.002, 8: 0.004}, "grouped": {1: 0.001, 8: 0.005}}  # geometric means: 2.83 vs 2.24 ms
    runners = {name: (lambda x, d=d: time.sleep(d[len(x)])) for name, d in delays.items()}
    best, medians = pick_fastest(runners, {1: np.zeros(1), 8: np.zeros(8)}, budget_s=0.5)
    assert best == "grouped" and medians["loop"][8] >= 0.004


def test_an_interleaved_run_stops_once_settled_and_auto_fusion_once_its_choice_is_settled():
    """A run whose question is answered stops at the next check after its minimum rounds, not at its budget; so
    `--fusion auto` stops timing once one fusion's geometric-mean latency is lower beyond noise (also where each
    wins at one batch size, as above) or the two are a tie (within 5%: timing longer would not change what is
    worth serving)."""
    import time
    from expertfuse.timing import SETTLED_EVERY, interleave, pick_fastest
    run = interleave({"a": lambda i: None, "b": lambda i: None}, min_rounds=7, budget_s=30, settled=lambda r: True)
    assert run.rounds == 2 * SETTLED_EVERY  # the first check at or after 7 rounds
    for delays, winners in [({"loop": {1: 0.004, 8: 0.008}, "grouped": {1: 0.001, 8: 0.002}}, {"grouped"}),
                            ({"loop": {1: 0.003, 8: 0.004}, "grouped": {1: 0.001, 8: 0.009}}, {"grouped"}),
                            ({"loop": {1: 0.002, 8: 0.004}, "grouped": {1: 0.002, 8: 0.004}}, {"loop", "grouped"})]:
        runners = {name: (lambda x, d=d: time.sleep(d[len(x)])) for name, d in delays.items()}
        started = time.monotonic()
        best, _ = pick_fastest(runners, {1: np.zeros(1), 8: np.zeros(8)}, budget_s=30)
        assert best in winners and time.monotonic() - started < 25, delays  # settled long before its 30 s budget


def test_trt_config_maps_profiles_to_instance_groups_with_cuda_graphs(tmp_path):
    """export.trt's config as written for a plan with two profiles (the build itself needs TensorRT and a GPU)."""
    from export.trt import Profile, prepare, publish_plan
    ckpt = make_checkpoint(tmp_path / "m.pt")
    job, settings = prepare(["--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--profiles", "1-8,32-128-256",
                             "--instance-count", "2", "--fusion", "grouped"])
    assert settings.profiles == [Profile(1, 8, 8), Profile(32, 128, 256)] and job.name == "ncl_trt"
    assert settings.parity_batches() == [1, 2, 7, 8, 32, 256]
    (tmp_path / "model.plan").write_bytes(b"not a real plan")
    model_dir, version = publish_plan(job, settings, tmp_path / "model.plan", {"tensorrt": "10.x"}, "grouped")
    cfg = parse((model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 256 and version == 1
    groups = [(g.kind, g.count, list(g.profile)) for g in cfg.instance_group]
    assert groups == [(cfg.instance_group[0].KIND_GPU, 2, ["0"]), (cfg.instance_group[0].KIND_GPU, 2, ["1"])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 128]
    assert cfg.optimization.cuda.graphs
    specs = [(s.batch_size, list(s.input["image"].dim)) for s in cfg.optimization.cuda.graph_spec]
    assert specs == [(8, [32, 32, 3]), (128, [32, 32, 3])]
    assert cfg.parameters["expertfuse_fusion"].string_value == "grouped"
    assert json.loads((model_dir / "1" / "build.json").read_text()) == {"tensorrt": "10.x"}


def test_trt_one_profile_without_cuda_graphs_and_refused_settings(tmp_path):
    from export.trt import prepare, publish_plan
    ckpt = make_checkpoint(tmp_path / "m.pt")
    job, settings = prepare(["--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--max-batch", "64",
                             "--no-cuda-graphs", "--name", "plain"])
    (tmp_path / "model.plan").write_bytes(b"x")
    cfg = parse((publish_plan(job, settings, tmp_path / "model.plan", {}, "loop")[0] / "config.pbtxt").read_text())
    assert [list(g.profile) for g in cfg.instance_group] == [["0"]] and not cfg.HasField("optimization")
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU and not cfg.dynamic_batching.preferred_batch_size
    for args, message in [(["--instance-kind", "cpu"], "TensorRT plans run on GPU instances"),
                          (["--profiles", "1-8,4-16"], "ascending batch ranges that do not overlap"),
                          (["--profiles", "8-4"], "1 <= MIN <= OPT <= MAX"),
                          (["--profiles", "1-8", "--opt-batch", "4"], "--profiles replaces --min-batch/--opt-batch"),
                          (["--profiles", "1-8", "--max-batch", "16"], "differs from the largest profile's 8"),
                          (["--name", "../evil"], "cannot be served by Triton")]:
        code, out, err = run_export("trt", "--ckpt", str(ckpt), "--out", str(tmp_path / "r2"), *args)
        assert code == 2 and message in err and out == "", (args, err)


def test_job_for_reuses_a_loaded_checkpoint(tmp_path):
    loaded = LoadedCheckpoint.load(make_checkpoint(tmp_path / "m.pt"))
    single, fused = job_for(loaded, "0"), job_for(loaded, "all", "grouped")
    assert single.model is fused.model is loaded.model and single.opts.experts == (0,) and fused.opts.experts == (0, 1, 2)
    assert single.name == "ncl_expert0" and fused.name == "ncl" and len(fused.checkpoint.sha256) == 64
