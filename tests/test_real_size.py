"""Every preset's architecture at its dataset's real size through export with defaults: the CIFAR-size networks in
the default run, the 224-px ones (ResNet-50, ResNeXt-50, ResNet-152; 365 to 8142 classes) with `-m slow`."""
from __future__ import annotations

import json

import pytest

from bench.real_size import preset_checkpoint
from serve.repository import parse
from tests.helpers import export_cli, run_module


def exported_report(repo, name: str) -> dict:
    return json.loads((repo / name / "1" / "export_report.json").read_text())


def check_default_export(preset: str, tmp_path, *extra: str) -> dict:
    """`export.onnx --ckpt --out` (plus `extra`) writes the fused model, its config and a passing gate report."""
    ckpt = preset_checkpoint(preset, tmp_path / f"{preset}.pt")
    repo = tmp_path / "repo"
    proc = export_cli("--ckpt", str(ckpt), "--out", str(repo), *extra)
    name, = (p.name for p in repo.iterdir() if p.is_dir())  # ncl, shike; ssd_soft (SSD serves its soft head)
    cfg = parse((repo / name / "config.pbtxt").read_text())
    report = exported_report(repo, name)
    assert "wrote" in proc.stdout and cfg.max_batch_size == int(dict(zip(extra[::2], extra[1::2])).get("--max-batch", 64))
    assert all(row["ok"] and row["ratio"] < 8 for row in report["parity"]) and report["fusion"] in ("loop", "grouped")
    return report


@pytest.mark.parametrize("preset", ["shike-cifar100-lt", "ssd-cifar100-lt"])
def test_cifar_presets_export_with_defaults(preset, tmp_path):
    """ResNet-32 with shortcut B, SHIKE's shared trunk and depth-wise fusion, and SSD's two heads on one trunk, at
    100 classes (ResNet-32 with shortcut A: tests/test_gate_depth.py)."""
    check_default_export(preset, tmp_path)


def test_cheap_paths_of_a_real_size_checkpoint_refuse_without_its_data(tmp_path):
    """--int8 and --early-exit need the labelled images the checkpoint names (CIFAR-100 here): without them, one
    line saying where they were looked for and how to get them, before any export work."""
    ckpt = preset_checkpoint("ncl-cifar100-lt", tmp_path / "ncl.pt")
    for flag, in_worker in ((["--int8"], False), (["--early-exit", "auto"], True)):  # the command, then its runner here
        args = ("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--data-root", str(tmp_path / "no-data"), *flag)
        proc = export_cli(*args, check=False) if in_worker else run_module("export.onnx", *args, check=False)
        assert proc.returncode == 2 and "CIFAR-100 not found" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ncl-imagenet-lt", "ssd-imagenet-lt", "ncl-places-lt", "ncl-inat2018"])
def test_224px_presets_export_with_defaults(preset, tmp_path):
    check_default_export(preset, tmp_path, "--max-batch", "8")


def test_roofline_parts_count_flops_and_measure_memory(tmp_path):
    """What the real-size bench reports next to each time: FLOPs per image (ResNet-32: 0.14 GFLOP per expert), the
    GEMM that sets the ceiling (it computes a matrix product), and a child's peak memory (a 300 MiB array shows)."""
    import os
    import sys

    import numpy as np

    from bench.real_size import flops_per_image, gemm_model, process_tree_peak_mib, run_measured
    from bench.measure.runners import OrtRunner
    from export.job import job_for

    job = job_for(preset_checkpoint("ncl-cifar100-lt", tmp_path / "ncl.pt"))
    one, three = flops_per_image(job, (0,)), flops_per_image(job, (0, 1, 2))
    assert 0.13e9 < one < 0.15e9 and three == pytest.approx(3 * one, rel=1e-3)
    gemm = OrtRunner(gemm_model(tmp_path / "gemm.onnx", size=64))
    a = np.random.RandomState(0).randn(64, 64).astype(np.float32)
    assert np.allclose(gemm.run(a), a @ gemm.run(np.eye(64, dtype=np.float32)), rtol=1e-4, atol=1e-4)
    child = run_measured([sys.executable, "-c", "import numpy; a = numpy.ones(300 * 2**20 // 8); print(a.sum())"])
    assert child["peak_rss_mib"] > 300 and child["wall_s"] > 0
    assert process_tree_peak_mib(os.getpid()) > 50


@pytest.mark.slow
def test_real_size_bench_runs_end_to_end(tmp_path):
    """The committed figures' command, shortened: ResNet-32 / 100 classes, in-process and served."""
    run_module("bench.real_size", "--models", "resnet32-100", "--batches", "1,4", "--budget-s", "1",
               "--concurrency", "1", "--window-s", "0.5", "--out", str(tmp_path / "out"), timeout=1800)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "fused grouped / one expert" in summary and "served fused / naive ensemble" in summary
