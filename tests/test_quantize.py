"""INT8 export: a real QDQ graph that ONNX Runtime runs, and an accuracy gate that refuses a damaged calibration."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import export.quantize as quantize
from expertfuse.errors import ParityError
from export.onnx import export_onnx
from serve.repository import read_config
from tests.helpers import REPO, export_cli, run_module

SMALL = ["--calib-images", "64", "--max-batch", "8", "--fusion", "loop", "--reduce-range", "off"]


def test_int8_graph_has_qdq_nodes_runs_and_records_its_gate(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    export_cli("--ckpt", str(tiny_checkpoint), "--out", str(repo), "--int8", *SMALL,
               "--max-overall-drop", "100", "--max-few-drop", "100")
    model = onnx.load(str(repo / "ncl_int8" / "1" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    conv_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert conv_weights, "weights are stored as INT8"
    images = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    logits = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], {"image": images})[0]
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    params = {k: v.string_value for k, v in read_config(repo / "ncl_int8").parameters.items()}
    assert params["expertfuse_precision"] == "int8" and params["expertfuse_int8_gate"] == "passed"
    report = json.loads((repo / "ncl_int8" / "1" / "export_report.json").read_text())
    assert report["gate"]["passed"] and {"overall", "few"} <= set(report["gate"]["int8"])
    assert report["splits"] == report["gate"]["splits"] and report["splits"]["chosen_on"].startswith(
        "synthetic calibration split") and report["splits"]["scored_on"].startswith("synthetic evaluation split")
    stems_and_heads = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")} & set(report["fp32_nodes"])
    assert len(stems_and_heads) == 6, "3 stems and 3 heads stay FP32"


def test_gate_refuses_constant_calibration_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("untouched")
    constant = lambda data, count, seed=0: np.zeros((count, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(quantize, "calibration_pixels", constant)  # damaged calibration: black images
    with pytest.raises(ParityError, match="INT8 refused"):
        export_onnx(["--ckpt", str(tiny_checkpoint), "--out", str(repo), "--int8", *SMALL])
    assert sorted(p.name for p in repo.rglob("*")) == ["keep.txt"]
    table = capsys.readouterr().out
    assert "fp32" in table and "int8" in table and "few" in table


def test_bad_flags_are_one_line_errors(tiny_checkpoint, tmp_path):
    proc = run_module("export.onnx", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path), "--int8", "--fp16", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = export_cli("--ckpt", str(tiny_checkpoint), "--out", str(tmp_path), "--early-exit", "2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# `python -m <module> <args>` SIGKILLed while ONNX Runtime calibrates (inside quantize_static's ort.quant.* folder).
KILL_IN_CALIBRATION = """
import os, runpy, signal, sys
import export.quantize
export.quantize.PixelReader.get_next = lambda self: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_a_killed_int8_export_leaves_onnx_runtimes_temp_folders_to_the_next_export(tiny_checkpoint, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    args = ["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "repo")]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CALIBRATION, "export.onnx", *args, "--int8", *SMALL],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(temp)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list(temp.glob("*quant*"))  # not in the system's temporary folder, where nothing removes them
    assert list(tmp_path.glob(".repo-staging-*/**/ort.quant.*"))
    export_cli(*args, "--fusion", "loop", "--max-batch", "8")
    assert not list(tmp_path.glob(".repo-staging-*"))


def test_int8_early_exit_chooses_on_calibration_and_gates_on_evaluation(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    export_cli("--ckpt", str(tiny_checkpoint), "--out", str(repo), "--int8", *SMALL, "--early-exit",
               "auto:0.5", "--eval-limit", "60", "--max-overall-drop", "100", "--max-few-drop", "100")
    report = json.loads((repo / "ncl_int8_early_exit" / "1" / "export_report.json").read_text())
    assert report["precision"] == "int8" and report["gate"]["passed"]
    assert report["gate"]["splits"] == report["early_exit"]["splits"]
    assert report["early_exit"]["splits"]["chosen_on"].startswith("synthetic calibration split")
    assert report["early_exit"]["auto"]["tolerance_points"] == 0.5
