from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.common import job_for
from export.graph import reference_logits
from export.onnx import export_graph
from serve.repository import parse
from tests.helpers import run_module
from torchvision.transforms.v2 import functional as F

from train.checkpoint import load_model, save_checkpoint
from train.data.synthetic import synthesize
from train.models import ModelSpec, build_model


def make_checkpoint(path: Path, **spec_fields) -> Path:
    """A checkpoint of an untrained network whose BatchNorm statistics were calibrated on real-looking images
    (fast, and with the activation scales of a trained model)."""
    torch.manual_seed(0)
    spec = ModelSpec(**{"arch": "resnet8", "num_classes": 10, "num_experts": 3, **spec_fields})
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    images = torch.from_numpy(synthesize([64], seed=3)[0]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        for batch in images.split(16):
            model.train()(F.normalize(batch, spec.mean, spec.std))
    return save_checkpoint({"spec": spec.to_dict(), "classes": [f"class{i}" for i in range(spec.num_classes)],
                            "train_counts": [100] * spec.num_classes, "state_dict": model.state_dict(), "method": "ncl",
                            "config": {}, "metrics": {}, "epoch": 1}, path)


def ort_logits(path: Path, images: np.ndarray, output: str = "logits") -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([output], {"image": images})[0]


def test_cli_exports_a_3_expert_resnet32_ncl_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ncl.pt", arch="resnet32")
    proc = run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fusion", "grouped",
                      "--max-batch", "16", "--instance-kind", "gpu", "--gpus", "0,1", "--preferred-batch-sizes", "8,16",
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
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["expertfuse.fusion"] == "grouped" and meta["expertfuse.experts"] == "0,1,2"
    assert len(meta["expertfuse.checkpoint_sha256"]) == 64 and "class3" in meta["expertfuse.classes"]
    model, _ = load_model(ckpt)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    ref = reference_logits(model, (0, 1, 2), images, "uint8-nhwc").numpy()
    assert np.abs(ort_logits(model_dir / "1" / "model.onnx", images.numpy()) - ref).max() <= 1e-4


def export_both_fusions(job, tmp_path: Path, outputs=("logits",), batch: int = 6) -> dict:
    """Export `loop` and `grouped`, run both in ONNX Runtime and check: logits equal the PyTorch reference
    (max |diff| <= 1e-4, same top-1) and every output agrees between the two strategies."""
    images = np.random.RandomState(1).randint(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    ref = reference_logits(job.model, job.opts.experts, torch.from_numpy(images), "uint8-nhwc").numpy()
    results = {}
    for fusion in ("loop", "grouped"):
        path = export_graph(job, fusion, tmp_path / fusion, 18)
        results[fusion] = {name: ort_logits(path, images, name) for name in ("logits", *outputs)}
        assert np.abs(results[fusion]["logits"] - ref).max() <= 1e-4
        assert (results[fusion]["logits"].argmax(1) == ref.argmax(1)).all()
    for name in results["loop"]:
        assert np.abs(results["loop"][name] - results["grouped"][name]).max() <= 1e-4, name
    return results["grouped"]


@pytest.mark.parametrize("spec", [dict(), dict(shortcut="B", shared_stages=2, head="cosine", head_scale=16)],
                         ids=["separate", "shared-trunk"])
def test_loop_and_grouped_agree_with_the_reference_in_onnxruntime(tmp_path, spec):
    job = job_for(make_checkpoint(tmp_path / "m.pt", **spec), probs=True, expert_logits=True, max_batch=8)
    out = export_both_fusions(job, tmp_path, ("probs", "expert_logits"), batch=9)
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-5) and out["expert_logits"].shape == (9, 3, 10)


def test_single_expert_and_float_input_paths(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--experts", "1", "--fusion", "loop",
               "--max-batch", "8")
    run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--experts", "1", "--fusion", "grouped",
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
    proc = run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fp16", "--fusion", "grouped",
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
        run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(repo), "--fusion", "loop", "--max-batch", "4", *extra)
        return sorted(p.name for p in (repo / "ncl").iterdir() if p.is_dir())
    assert export_and_list() == ["1"]
    assert export_and_list() == ["1", "2"]
    assert export_and_list("--overwrite") == ["1"]


def test_bad_inputs_fail_cleanly_and_leave_the_repository_as_it_was(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", num_experts=2)
    repo = tmp_path / "repo"
    run_module("export.onnx", "--ckpt", str(ckpt), "--out", str(repo), "--fusion", "loop", "--max-batch", "4")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    (tmp_path / "not-a-checkpoint.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "file").write_text("x")
    cases = [(["--ckpt", str(tmp_path / "missing.pt")], 2, "checkpoint not found"),
             (["--ckpt", str(tmp_path / "not-a-checkpoint.pt")], 2, "not a readable expertfuse checkpoint"),
             (["--ckpt", str(ckpt), "--experts", "0,5"], 2, "the checkpoint has experts 0..1"),
             (["--ckpt", str(ckpt), "--out", str(tmp_path / "file" / "repo")], 2, "cannot write"),
             (["--ckpt", str(ckpt), "--atol", "0"], 1, "parity failed"),
             (["--ckpt", str(ckpt), "--preferred-batch-sizes", "2,8"], 2, "must lie in 1..--max-batch 4"),
             (["--ckpt", str(ckpt), "--version-policy", "newest"], 2, "version policy must be latest:N"),
             (["--ckpt", str(ckpt), "--instance-kind", "cpu", "--ort-tensorrt"], 2, "GPU instances only"),
             (["--ckpt", str(ckpt), "--instance-kind", "cpu", "--gpus", "0"], 2, "GPU instances only")]
    for args, code, message in cases:
        proc = run_module("export.onnx", "--fusion", "grouped", "--max-batch", "4", "--out", str(repo), *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == sorted(before + ["file", "not-a-checkpoint.pt"])  # no new version, no staging leftovers


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
