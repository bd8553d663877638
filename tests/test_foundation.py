"""The shared bottom layer: parity tolerances, the model contract, preprocessing, the CLI dispatcher, layers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertfuse import contract, parity, preprocess
from expertfuse.errors import ParityError, UserError
from tests.helpers import REPO


ALLCLOSE = parity.Tolerance("allclose", rtol=1e-4, atol=1e-4)


def test_parity_compares_like_allclose_so_large_logits_pass_on_relative_error():
    ref = np.array([[6.7e4, 1.0e4, -3.0e4], [1.0, 2.0, 3.0]])
    got = ref * (1 + 1e-7)
    assert np.abs(got - ref).max() > 1e-4  # an absolute 1e-4 bound would refuse this
    result = parity.compare(got, ref, ALLCLOSE)
    assert result.ok and result.top1_agreement == 1.0
    assert not parity.compare(ref * 1.01, ref, ALLCLOSE).ok


def test_parity_excuses_top1_flips_only_on_near_ties():
    ref = np.array([[1.0, 1.0 + 1e-6, 0.0], [5.0, 1.0, 0.0]])
    near_tie_flip = np.array([[1.0 + 1e-6, 1.0, 0.0], [5.0, 1.0, 0.0]])
    assert parity.compare(near_tie_flip, ref, ALLCLOSE).ok
    real_flip = np.array([[1.0, 1.0, 0.0], [1.0, 5.0, 0.0]])
    assert parity.compare(real_flip, ref, ALLCLOSE).top1_disagreements == 1


def test_export_gate_is_held_to_float32s_own_error_against_float64():
    """The same graph error passes where PyTorch float32 itself strays that far (a deep net) and fails where it
    does not (a shallow one): the bound scales with float32's error, not a fixed 1e-4."""
    rng = np.random.default_rng(0)
    ref64 = rng.normal(scale=300, size=(16, 100))  # logits of a deep random-weight ResNet-32
    graph = ref64 + rng.normal(scale=4e-4 / 3, size=ref64.shape)  # a few 1e-4 off, as ONNX Runtime is there
    deep = parity.compare(graph, ref64, parity.EXPORT_FP32, reference_error=2.5e-4)
    assert deep.ok and 0.5 < deep.ratio < 4 and deep.bound == pytest.approx(8 * 2.5e-4 + parity.FLOAT32_EPS
                                                                             * np.abs(ref64).max())
    shallow = parity.compare(graph, ref64, parity.EXPORT_FP32, reference_error=1e-6)
    assert not shallow.ok and shallow.ratio > 100
    assert "PyTorch float32's own" in shallow.describe() and "bound" in shallow.describe()
    tiny = np.full((2, 3), 1e-3) * [[1, 2, 3]]  # float32's own error 0: the floor (epsilons of the logits) judges
    assert parity.compare(tiny * (1 + 0.5 * parity.FLOAT32_EPS), tiny, parity.EXPORT_FP32, 0.0).ok
    with pytest.raises(ValueError, match="float32's own error"):
        parity.compare(graph, ref64, parity.EXPORT_FP32)


def test_reduced_precision_is_judged_by_top1_agreement_and_require_raises_parity_error():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10))
    got = ref + rng.normal(scale=0.05, size=ref.shape)
    assert parity.compare(got, ref, parity.BENCH_FP16).ok
    wrong = rng.normal(size=ref.shape)
    result = parity.compare(wrong, ref, parity.EXPORT_FP16)
    with pytest.raises(ParityError, match="top-1 agreement"):
        parity.require(result, "model.onnx")
    assert parity.bench_tolerance("int8").name == "bench-int8"
    with pytest.raises(UserError, match="none of fp32, fp16, int8"):
        parity.bench_tolerance("fp8")


def test_metadata_round_trips_through_properties_and_triton_parameters():
    meta = contract.ModelMetadata(classes=["cat", "dog"], mean=[0.5] * 3, std=[0.25] * 3, input_size=32, resize=36,
                                  experts=[0, 2], fusion="grouped", precision="int8", method="ncl",
                                  extra={"int8_gate": "passed"})
    props = meta.to_properties()
    assert all(k.startswith("expertfuse_") for k in props)
    assert contract.ModelMetadata.from_properties(props) == meta
    params = meta.triton_parameters()
    assert "expertfuse_classes" not in params
    assert contract.ModelMetadata.from_properties(params, classes=["cat", "dog"]) == meta
    with pytest.raises(UserError, match="expertfuse_resize"):
        contract.ModelMetadata.from_properties({"expertfuse_classes": "[]"})


@pytest.mark.parametrize("name", ["a b", "../evil", "", ".hidden", "x/y", "a" * 129])
def test_model_names_triton_cannot_serve_are_refused(name):
    with pytest.raises(UserError, match="cannot be served by Triton"):
        contract.check_model_name(name)


def test_model_names_triton_serves_are_accepted():
    for name in ("ncl", "ncl_expert0", "ncl-fp16", "ncl.v2", "_x"):
        assert contract.check_model_name(name) == name


def test_one_normalization_for_training_export_and_graph():
    pixels = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    batch = preprocess.normalize_pixels(pixels, mean, std)
    per_image = torch.stack([preprocess.eval_transform(8, 8, mean, std)(p.permute(2, 0, 1)) for p in pixels])
    torch.testing.assert_close(batch, per_image, rtol=1e-6, atol=1e-6)
    scale, shift = preprocess.folded_normalization(mean, std)
    torch.testing.assert_close(pixels.permute(0, 3, 1, 2).float() * scale - shift, batch, rtol=1e-5, atol=1e-5)
    as_float = preprocess.normalize_pixels(pixels.permute(0, 3, 1, 2).float(), mean, std, "float-nchw")
    torch.testing.assert_close(as_float, batch)


@pytest.mark.parametrize("height,width,resize,size", [(32, 32, 32, 32), (32, 37, 32, 32), (41, 36, 36, 31),
                                                       (48, 40, 32, 32), (20, 20, 32, 32), (300, 256, 256, 224)])
def test_served_pixels_are_the_pixel_transforms_with_or_without_resampling(height, width, resize, size):
    """Images already at the shorter side `resize` are only cropped, in numpy; the rest go through torchvision:
    either way the pixels the served model gets are pixel_transform's, from a PIL image or an HWC array."""
    array = np.random.RandomState(height + width).randint(0, 256, (height, width, 3), dtype=np.uint8)
    expected = preprocess.pixel_transform(resize, size)(array).permute(1, 2, 0).numpy()
    for image in (array, Image.fromarray(array)):
        got = preprocess.served_pixels(image, resize, size)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_the_client_reads_images_at_the_models_size_without_torch():
    code = ("import sys, numpy as np, serve.client; from expertfuse.preprocess import served_pixels; "
            "served_pixels(np.zeros((32, 40, 3), np.uint8), 32, 32); "
            "print(sorted({'torch', 'torchvision', 'onnxruntime'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout == "[]\n"


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = np.asarray(preprocess.load_rgb(tmp_path / "deep.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert (rgb == 255).mean() < 0.01
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 65535 * 255), atol=1)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "notes.jpg").write_text("not pixels")
    with pytest.raises(UserError, match="notes.jpg is not a readable image"):
        preprocess.load_rgb(tmp_path / "notes.jpg")


def test_expertfuse_command_dispatches_to_the_stage_entry_points():
    run = lambda *a: subprocess.run([sys.executable, "-m", "expertfuse", *a], cwd=REPO, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    assert "python -m train" in run("--help").stdout
    for command, prog in (("train", "python -m train"), ("export", "python -m export.onnx"),
                          ("client", "serve.client")):
        proc = run(command, "--help")
        assert proc.returncode == 0 and prog in proc.stdout, proc.stderr[-500:]
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_layers_hold():
    """bench > export > train | serve > expertfuse: lint-imports fails on any import against them."""
    lint = Path(sys.executable).parent / "lint-imports"  # installed beside this interpreter by the dev extra
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-2000:]
