import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from google.protobuf import text_format
from PIL import Image

from serve.repository import ServingOptions, TensorSpec, model_config, parse, read_config, render, write_config
from serve.bundled import gpu_visible
from serve.server import DEFAULT_IMAGE, TritonServer
from tests.helpers import REPO, run_module


def local_logits(repo: Path, model: str, images: np.ndarray) -> np.ndarray:
    path = repo / model / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": images})[0]


def _infer(module, url, model, images, **output_kw):
    client = module.InferenceServerClient(url)
    try:
        request = module.InferInput("image", list(images.shape), "UINT8")
        request.set_data_from_numpy(images)
        return client.infer(model, [request], outputs=[module.InferRequestedOutput("logits", **output_kw)]).as_numpy("logits")
    finally:
        client.close()


def test_every_written_config_parses_with_model_config_pb2(exported_repository, tmp_path):
    for model_dir in (p for p in exported_repository.iterdir() if p.is_dir()):  # beside them: the publish lock
        text = (model_dir / "config.pbtxt").read_text()
        assert parse(text).name == model_dir.name
    ensemble = read_config(exported_repository / "ncl_naive")
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["ncl_expert0", "ncl_expert1", "ncl_expert2",
                                                                         "ncl_naive_mean"]
    opts = ServingOptions(max_batch_size=8, preferred_batch_sizes=[4, 8], instance_kind="gpu", instance_count=2, gpus=[0],
                          ort_tensorrt=True, ort_tensorrt_fp16=True, ort_tensorrt_cache="/cache", versions="specific:1,3",
                          warmup_batch_sizes=[1, 8, 99])
    cfg = parse(render(model_config("m", "onnxruntime_onnx", [TensorSpec("image", "UINT8", [8, 8, 3], "NHWC")],
                                    [TensorSpec("logits", "FP32", [4], labels=True)], opts)))
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8] and list(cfg.version_policy.specific.versions) == [1, 3]
    assert cfg.instance_group[0].count == 2 and [w.batch_size for w in cfg.model_warmup] == [1, 8]
    assert read_config(write_config(tmp_path, cfg).parent) == cfg and os.listdir(tmp_path) == ["config.pbtxt"]
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        parse(text.replace("max_batch_size", "max_batch_sise"))


def test_http_and_grpc_equal_local_onnxruntime_with_labels(triton, exported_repository):
    images = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = local_logits(exported_repository, "ncl", images)
    for module, url in ((httpclient, triton.endpoints.http), (grpcclient, triton.endpoints.grpc)):
        got = _infer(module, url, "ncl", images)
        assert np.array_equal(got, expected)
        top = _infer(module, url, "ncl", images, class_count=2)
        labels = (exported_repository / "ncl" / "labels.txt").read_text().split()
        for row, logits in zip(top, expected):
            score, index, label = (row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")
            assert int(index) == logits.argmax() and label == labels[int(index)]
            assert abs(float(score) - logits.max()) < 1e-4


def test_naive_ensemble_serves_the_same_function(triton):
    images = np.random.RandomState(1).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    fused = _infer(grpcclient, triton.endpoints.grpc, "ncl", images)
    naive = _infer(grpcclient, triton.endpoints.grpc, "ncl_naive", images)
    assert np.abs(fused - naive).max() < 1e-4


def test_dynamic_batching_merges_concurrent_requests(triton):
    async def burst():
        client = grpc_aio.InferenceServerClient(triton.endpoints.grpc)
        try:
            image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
            request = grpc_aio.InferInput("image", [1, 32, 32, 3], "UINT8")
            request.set_data_from_numpy(image)
            await asyncio.gather(*(client.infer("ncl_expert0", [request]) for _ in range(48)))
        finally:
            await client.close()
    before = _stats(triton)
    asyncio.run(burst())
    after = _stats(triton)
    deadline = time.monotonic() + 30  # Triton may record a request's statistics after the client has its response
    while after[0] - before[0] < 48 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _stats(triton)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 48 and executions < inferences


def _stats(triton):
    client = httpclient.InferenceServerClient(triton.endpoints.http)
    try:
        s = client.get_inference_statistics("ncl_expert0")["model_stats"][0]
        return s["inference_count"], s["execution_count"]
    finally:
        client.close()


def test_bad_requests_fail_while_the_server_keeps_serving(triton):
    client = httpclient.InferenceServerClient(triton.endpoints.http)
    try:
        cases = [("ncl", np.zeros((1, 16, 16, 3), np.uint8), "UINT8", "unexpected shape"),
                 ("ncl", np.zeros((1, 32, 32, 3), np.float32), "FP32", "data-type"),
                 ("nope", np.zeros((1, 32, 32, 3), np.uint8), "UINT8", "unknown model")]
        for model, array, dtype, message in cases:
            request = httpclient.InferInput("image", list(array.shape), dtype)
            request.set_data_from_numpy(array)
            with pytest.raises(httpclient.InferenceServerException, match=message):
                client.infer(model, [request])
        assert client.is_server_ready() and client.is_model_ready("ncl")
    finally:
        client.close()


def test_client_cli_classifies_a_real_image_file(triton, tmp_path):
    """A JPEG larger than the model's input (resampled, as training's evaluation does) over HTTP; one already at
    its shorter side (center-cropped only) over gRPC, with the client's and with image_client's flags."""
    from train.data.synthetic import synthesize
    large, wide = tmp_path / "large", tmp_path / "wide"
    for folder, pixels in ((large, synthesize([1], seed=5, image_size=48)[0][0]),
                           (wide, np.pad(synthesize([1], seed=5, image_size=32)[0][0], ((0, 0), (3, 4), (0, 0))))):
        folder.mkdir()
        Image.fromarray(pixels).save(folder / "cat.jpg")
    for protocol, url, folder in (("http", triton.endpoints.http, large), ("grpc", triton.endpoints.grpc, wide)):
        proc = run_module("serve.client", "--url", url, "--protocol", protocol, "--model", "ncl", "--topk", "3",
                          str(folder))
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 3 and lines[0].startswith(f"{folder / 'cat.jpg'}  pattern")
    proc = run_module("serve.client", "-u", f"http://{triton.endpoints.grpc}/v2", "-i", "grpc", "-m", "ncl", "-x", "1",
                      str(wide / "cat.jpg"))  # image_client's flags; a URL pasted with scheme and path
    assert proc.stdout.startswith(lines[0]) and not proc.stderr
    proc = run_module("serve.client", "--url", triton.endpoints.grpc, "--protocol", "grpc", "--model", "nope",
                      str(wide / "cat.jpg"), check=False)
    assert proc.returncode == 2 and "is not served" in _one_line(proc.stderr) and "ncl_naive" in proc.stderr


def test_client_classifies_the_readable_images_of_a_folder_and_names_each_unreadable_one(triton, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "broken.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    proc = run_module("serve.client", "--url", triton.endpoints.http, "--model", "ncl", "--topk", "1", str(tmp_path),
                      check=False)
    assert proc.returncode == 2 and proc.stdout.startswith(f"{tmp_path / 'grey.png'}  ")
    skipped, error = proc.stderr.strip().splitlines()[:-1], proc.stderr.strip().splitlines()[-1]
    assert [line.split(" is not")[0] for line in skipped] == [f"skipped: {tmp_path / n}" for n in ("broken.jpg", "empty.png")]
    assert error == "error: 2 of 3 images could not be read (each named above); the other 1 were classified"


def test_client_names_the_models_that_take_images_when_asked_for_one_that_does_not(triton, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    proc = run_module("serve.client", "--url", triton.endpoints.http, "--model", "ncl_naive_mean",
                      str(tmp_path / "grey.png"), check=False)
    line = _one_line(proc.stderr)
    assert proc.returncode == 2 and "model 'ncl_naive_mean' does not take images (its inputs: " in line
    assert line.endswith("that do: ncl, ncl_expert0, ncl_expert1, ncl_expert2, ncl_naive")


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_client_refuses_bad_flags_in_one_line_and_says_when_it_caps_topk(triton, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "empty").mkdir()
    http = triton.endpoints.http
    cases = [(["--url", "https://127.0.0.1:1/v2", str(tmp_path)], "is not a Triton address: give host:port"),
             ([str(tmp_path / "empty")], f"no images found in {tmp_path / 'empty'} (looked for")]
    for args, message in cases:
        proc = run_module("serve.client", "--url", http, "--model", "ncl", *args, check=False)
        assert proc.returncode == 2 and message in _one_line(proc.stderr)
    for flag in ("--topk", "--batch-size"):
        proc = run_module("serve.client", "--url", http, "--model", "ncl", flag, "0", str(tmp_path), check=False)
        assert proc.returncode == 2 and f"argument {flag}: expected one positive integer, got '0'" in proc.stderr
    proc = run_module("serve.client", "--url", http, "--model", "ncl", "--topk", "1000", str(tmp_path / "grey.png"))
    assert len(proc.stdout.strip().splitlines()) == 10
    assert _one_line(proc.stderr) == "note: --topk 1000 is more than model 'ncl''s 10 classes; showing all 10"


def test_client_scales_16_bit_grayscale_pngs_and_classifies_them_like_their_8_bit_version(triton, tmp_path):
    from serve.client import ModelInfo, read_images
    gray8 = np.random.RandomState(3).randint(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(gray8, mode="L").save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # full 16-bit range
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    info = ModelInfo("ncl", "", "image", "UINT8", "NHWC", 32, 36, "logits", 10, 16)
    pixels8, pixels16 = read_images([tmp_path / "gray8.png", tmp_path / "gray16.png"], info)[1]
    assert np.array_equal(pixels8, pixels16) and (pixels16 == 255).mean() < 0.05
    proc = run_module("serve.client", "--url", triton.endpoints.http, "--model", "ncl", "--topk", "10", "--json",
                      str(tmp_path / "gray8.png"), str(tmp_path / "gray16.png"))
    eight, sixteen = json.loads(proc.stdout)
    assert eight["predictions"] == sixteen["predictions"]


def test_broken_repository_fails_fast_with_the_reason(tmp_path, exported_repository):
    broken = tmp_path / "repo"
    (broken / "bad" / "1").mkdir(parents=True)
    (broken / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "python"\nmax_batch_size: 4\n'
                                                 'input [{ name: "x" data_type: TYPE_FP32 dims: [2] }]\n'
                                                 'output [{ name: "y" data_type: TYPE_FP32 dims: [2] }]\n')
    (broken / "bad" / "1" / "model.py").write_text("raise RuntimeError('model.py is broken on purpose')\n")
    started = time.monotonic()
    proc = run_module("serve", "--repository", str(broken), "--server", "bundled", "--http-port", "0", "--grpc-port", "0",
                      "--metrics-port", "0", check=False, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert "model 'bad' version 1 failed to load" in _one_line(proc.stderr) and "broken on purpose" in proc.stderr
    (broken / "bad" / "config.pbtxt").write_text('name: "bad"\nmax_batch_sise: 4\n')
    proc = run_module("serve", "--repository", str(broken), "--server", "bundled", check=False)
    assert proc.returncode == 2 and "max_batch_sise" in _one_line(proc.stderr)


def test_stop_leaves_no_process_and_no_shared_memory(exported_repository):
    server = TritonServer(exported_repository, "bundled").start()
    pid, prefix = server.process.pid, server.shm_prefix
    assert list(Path("/dev/shm").glob(f"{prefix}*"))
    server.stop()
    server.cleanup()
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines()[1:] if line.split()[0] == str(pid) or line.split()[1] == str(pid)]


def test_launcher_serves_until_sigterm(fused_only_repository):
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-repository", str(fused_only_repository), "--server",
                             "bundled",
                             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving"):
            break
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == 0, err
    assert "server: bundled" in text and "ncl v1 READY  image UINT8 [-1, 32, 32, 3] -> logits FP32 [-1, 10]" in text
    assert "stopping (SIGTERM)" in text


def test_models_meet_nvidia_image_client_requirements(triton):
    """image_client.py (Triton client examples) accepts a model with exactly one input of 3 dims plus batch
    and a declared NHWC/NCHW format, and one FP32 vector output; labels come from label_filename."""
    client = grpcclient.InferenceServerClient(triton.endpoints.grpc)
    try:
        meta, cfg = client.get_model_metadata("ncl"), client.get_model_config("ncl").config
    finally:
        client.close()
    assert len(meta.inputs) == len(meta.outputs) == len(cfg.input) == 1
    assert meta.outputs[0].datatype == "FP32" and sum(d > 1 for d in meta.outputs[0].shape[1:]) == 1
    assert len(meta.inputs[0].shape) == 4 and cfg.max_batch_size > 0
    assert cfg.input[0].format == cfg.input[0].FORMAT_NHWC and cfg.output[0].label_filename == "labels.txt"


def test_bundled_mode_refuses_tensorrt_plans(tmp_path):
    model = tmp_path / "repo" / "plan"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.plan").write_bytes(b"\0")
    cfg = model_config("plan", "tensorrt_plan", [TensorSpec("image", "UINT8", [8, 8, 3], "NHWC")],
                       [TensorSpec("logits", "FP32", [4])], ServingOptions(instance_kind="gpu"))
    write_config(model, cfg)
    proc = run_module("serve", "--repository", str(tmp_path / "repo"), "--server", "bundled", check=False)
    assert proc.returncode == 2 and "TensorRT plan" in _one_line(proc.stderr) and "--server local or docker" in proc.stderr


def test_docker_command_mounts_the_repository_and_asks_for_gpus_only_when_present(exported_repository):
    server = TritonServer(exported_repository, "docker", http_port=18000, grpc_port=18001, metrics_port=18002)
    try:
        command, _ = server.command()
    finally:
        server.cleanup()
    assert command[:2] == ["docker", "run"] and f"{exported_repository.resolve()}:/models:ro" in command
    assert ("--gpus=all" in command) == gpu_visible()
    assert "-p127.0.0.1:18000:18000" in command and "--http-address=0.0.0.0" in command
    assert command[command.index(DEFAULT_IMAGE) + 1] == "tritonserver"
