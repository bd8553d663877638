"""INT8 post-training quantization of the exported graph, calibrated and gated by accuracy.

  python -m export.onnx --ckpt runs/ncl/ncl.pt --int8 [--calib-images 512] [--calib-method minmax|entropy|percentile]
      [--reduce-range auto|on|off] [--max-overall-drop 0.5] [--max-few-drop 1.0] [training data flags]

Static quantization with onnxruntime.quantization (quant_pre_process, then quantize_static in QDQ
format, per-channel symmetric INT8 weights), calibrated on training images sampled class-balanced so
the tail classes shape the activation ranges. The stem convolutions (3 input channels: under 1% of
the FLOPs, and they see the raw image) and the linear heads (tiny, and they write the logits whose
small margins decide the tail classes) stay FP32. Without VNNI, ORT's U8S8 kernels can saturate, so
`--reduce-range auto` quantizes with 7-bit weights and without and keeps the more accurate on the
calibration split. The gate runs on the labelled evaluation split before anything is written: overall top-1 may drop at most
--max-overall-drop points and few-shot top-1 at most --max-few-drop points against FP32, else the
export exits 1 (ParityError) and the repository stays as it was.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                      quantize_static)

from expertfuse.contract import INPUT, LOGITS, ModelMetadata
from expertfuse.errors import ParityError, UserError
from expertfuse.preprocess import graph_input
from expertfuse.timing import describe_choice, pick_fastest
from export.job import ExportJob
from export.data_flags import LabelledData, add_data_args
from export.labelled import (EvalSet, accuracy_table, calibration_pixels, load_splits, shot_accuracy,
                             splits_record)
from export.sessions import session_options
from export.triton import publish
from serve.repository import ServingOptions, staging

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
REDUCE_RANGE = {"auto": [False, True], "on": [True], "off": [False]}
CALIB_BATCH = 32
GraphWriter = Callable[[ExportJob, str, Path], Path]  # (job, fusion, folder) -> the FP32 .onnx file (export.onnx's)


@dataclass
class Int8Settings:
    """The INT8 flags: calibration, the reduce-range choice and the accuracy gate's limits (points of top-1)."""
    calib_images: int = 512
    calib_method: str = "minmax"
    reduce_range: str = "auto"
    max_overall_drop: float = 0.5
    max_few_drop: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Int8Settings | None":
        """None without --int8; a UserError names a bad value before any work."""
        if not args.int8:
            return None
        settings = cls(**{name: getattr(args, name) for name in INT8_FLAGS})
        if settings.calib_images < 1:
            raise UserError("--calib-images must be at least 1")
        if not (settings.max_overall_drop >= 0 and settings.max_few_drop >= 0):
            raise UserError("--max-overall-drop and --max-few-drop are points of top-1, 0 or more")
        return settings


INT8_FLAGS = tuple(f.name for f in fields(Int8Settings))  # the INT8 flags' argparse names


def add_int8_args(p: argparse.ArgumentParser) -> None:
    default = Int8Settings()
    group = p.add_argument_group("INT8 (static quantization, QDQ)")
    group.add_argument("--int8", action="store_true", help="INT8 QDQ graph, calibrated and accuracy-gated")
    group.add_argument("--calib-images", type=int, default=default.calib_images,
                       help=f"calibration images, class-balanced [{default.calib_images}]")
    group.add_argument("--calib-method", choices=sorted(CALIBRATION_METHODS), default=default.calib_method,
                       help=f"[{default.calib_method}]")
    group.add_argument("--reduce-range", choices=sorted(REDUCE_RANGE), default=default.reduce_range,
                       help=f"7-bit weights (no-VNNI CPUs); auto keeps the more accurate [{default.reduce_range}]")
    group.add_argument("--max-overall-drop", type=float, default=default.max_overall_drop,
                       help=f"gate: top-1 points vs FP32 [{default.max_overall_drop}]")
    group.add_argument("--max-few-drop", type=float, default=default.max_few_drop,
                       help=f"gate: few-shot top-1 points vs FP32 [{default.max_few_drop}]")
    add_data_args(p)


@dataclass
class Calibration:
    """What INT8 reads once per export: the calibration split (the reduce-range choice, and the class-balanced
    calibration inputs drawn from it) and the evaluation split (the gate), disjoint."""
    choice: EvalSet
    data: EvalSet
    inputs: np.ndarray  # in the graph's input layout
    layout: str

    @classmethod
    def load(cls, job: ExportJob, settings: Int8Settings, labelled: LabelledData) -> "Calibration":
        choice, data = load_splits(job.checkpoint.data, job.spec, labelled)
        pixels = calibration_pixels(choice, settings.calib_images)
        print(f"INT8: {len(pixels)} class-balanced calibration images ({settings.calib_method}) of the {choice.source}; "
              f"gate on the {data.source}")
        return cls(choice, data, graph_input(pixels, job.opts.input_layout), job.opts.input_layout)

    @property
    def splits(self) -> dict[str, str]:
        return splits_record(self.choice, self.data)

    def accuracy(self, logits: np.ndarray, split: EvalSet | None = None) -> dict[str, float]:
        """Top-1 by shot group on `split` (default: the evaluation split)."""
        return shot_accuracy(np.asarray(logits).argmax(1), split or self.data)

    def accuracy_of(self, model: Path, split: EvalSet | None = None) -> dict[str, float]:
        split = split or self.data
        return self.accuracy(run_logits(cpu_session(model), split.inputs(self.layout)), split)


class PixelReader(CalibrationDataReader):
    """Calibration batches of graph inputs."""

    def __init__(self, inputs: np.ndarray):
        self.batches = iter([inputs[i:i + CALIB_BATCH] for i in range(0, len(inputs), CALIB_BATCH)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes kept in FP32: the stem convolutions (the first Conv on every path from the input) and the heads."""
    before_conv = {i.name for i in model.graph.input}
    keep = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Conv" and node.input[0] in before_conv:
            keep.append(node.name)
        elif node.op_type in ("Gemm", "MatMul"):
            keep.append(node.name)
        elif node.op_type != "Conv" and any(i in before_conv for i in node.input):
            before_conv.update(node.output)
    return keep


def quantize_graph(fp32: Path, out: Path, calib: np.ndarray, method: str, reduce_range: bool,
                   symmetric_activations: bool = False) -> Path:
    """fp32 ONNX -> INT8 QDQ ONNX at `out`. Symmetric INT8 activations are TensorRT's explicit-quantization form;
    ORT's CPU kernels prefer asymmetric UINT8 activations (U8S8)."""
    pre = out.with_name(out.stem + ".pre.onnx")
    with temporary_files_in(out.parent):
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), PixelReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                        calibrate_method=CALIBRATION_METHODS[method], nodes_to_exclude=fp32_nodes(onnx.load(str(pre))),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric_activations})
    pre.unlink()
    return out


@contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """ONNX Runtime's quantization makes its temporary folders (ort.quant.*, pre.quant.*) in the default temporary
    directory and takes no other: point `tempfile` at `folder` (the export's staging folder), so a killed export's
    are removed with its staging folder by the next export."""
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def cpu_session(model: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(),
                                providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([sess.run([LOGITS], {INPUT: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def quantize_most_accurate(fp32: Path, calibration: Calibration, settings: Int8Settings) -> tuple[Path, dict]:
    """Quantize with each reduce-range choice and keep the most accurate (overall, then few-shot) on the calibration
    split."""
    tried = {}
    for rr in REDUCE_RANGE[settings.reduce_range]:
        path = quantize_graph(fp32, fp32.with_name(f"int8-rr{int(rr)}.onnx"), calibration.inputs,
                              settings.calib_method, rr)
        tried[rr] = (path, calibration.accuracy_of(path, calibration.choice))
    best = max(tried, key=lambda rr: (tried[rr][1]["overall"], np.nan_to_num(tried[rr][1]["few"])))
    return tried[best][0], {"reduce_range": best, "reduce_range_chosen_on": calibration.choice.source,
                            "accuracy_by_reduce_range": {("on" if rr else "off"): acc for rr, (_, acc) in tried.items()}}


@dataclass
class GateResult:
    fp32: dict[str, float]
    int8: dict[str, float]
    max_overall_drop: float
    max_few_drop: float
    splits: dict[str, str] = field(default_factory=dict)  # the split that chose (calibration) and the one that scored

    @property
    def overall_drop(self) -> float:
        return self.fp32["overall"] - self.int8["overall"]

    @property
    def few_drop(self) -> float:
        few = self.fp32["few"] - self.int8["few"]
        return 0.0 if few != few else few  # a split without few-shot classes

    @property
    def passed(self) -> bool:
        return self.overall_drop <= self.max_overall_drop and self.few_drop <= self.max_few_drop

    def to_dict(self) -> dict:
        return {"passed": self.passed, "overall_drop": self.overall_drop, "few_drop": self.few_drop,
                "max_overall_drop": self.max_overall_drop, "max_few_drop": self.max_few_drop,
                "fp32": self.fp32, "int8": self.int8, "splits": self.splits}

    def metadata_extra(self) -> dict[str, str]:
        """What ModelMetadata.extra carries (expertfuse_int8_gate, ...)."""
        return {"int8_gate": "passed" if self.passed else "refused", "int8_top1_drop": f"{self.overall_drop:.3f}",
                "int8_few_top1_drop": f"{self.few_drop:.3f}", "int8_top1": f"{self.int8['overall']:.3f}"}


def accuracy_gate(fp32: dict, int8: dict, settings: Int8Settings, what: str = "INT8",
                  splits: dict[str, str] | None = None) -> GateResult:
    """Print the per-shot-group table; raise ParityError when the INT8 graph loses more than the flags allow."""
    gate = GateResult(fp32, int8, settings.max_overall_drop, settings.max_few_drop, splits or {})
    print(f"accuracy gate on the {gate.splits.get('scored_on', 'labelled evaluation split')} (top-1 %):\n" + accuracy_table({"fp32": fp32, what.lower(): int8}))
    if not gate.passed:
        raise ParityError(f"{what} refused: top-1 drops {gate.overall_drop:.2f} points (limit {gate.max_overall_drop:g}), "
                          f"few-shot {gate.few_drop:.2f} points (limit {gate.max_few_drop:g}); nothing written")
    print(f"{what} gate passed: top-1 {-gate.overall_drop:+.2f}, few-shot {-gate.few_drop:+.2f} points")
    return gate


def stamp_metadata(model_file: Path, meta: ModelMetadata) -> None:
    """Replace the graph's metadata_props by `meta` (a composed or quantized graph records what it is)."""
    proto = onnx.load(str(model_file))
    del proto.metadata_props[:]
    for key, value in meta.to_properties().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(model_file))
    onnx.checker.check_model(str(model_file))


def write_report(folder: Path, report: dict) -> Path:
    """export_report.json beside the model: what every export (FP32, INT8, early exit) checked and chose."""
    path = folder / "export_report.json"
    path.write_text(json.dumps({**report, "onnxruntime": ort.__version__}, indent=2, default=float))
    return path


def pick_int8_fusion(candidates: dict[str, Path], calib: np.ndarray) -> tuple[str, dict]:
    """The INT8 fusion ONNX Runtime runs fastest here (batch 1 and 32), measured interleaved."""
    if len(candidates) == 1:
        return next(iter(candidates)), {}
    runners = {f: (lambda x, s=cpu_session(path): s.run([LOGITS], {INPUT: x})) for f, path in candidates.items()}
    best, timings = pick_fastest(runners, {1: calib[:1], 32: calib[:32]})
    print(f"INT8 fusion: {describe_choice(timings, best)}")
    return best, timings


def export_int8(job: ExportJob, settings: Int8Settings, labelled: LabelledData, serving: ServingOptions,
                write_graph: GraphWriter) -> Path:
    """Quantize the fused graph (loop or grouped, chosen by measurement), gate it, and only then publish it."""
    calibration = Calibration.load(job, settings, labelled)
    fusions = ["loop", "grouped"] if job.opts.fusion == "auto" else [job.opts.fusion]
    with staging(job.request.out) as work:
        fp32, int8, choices = {}, {}, {}
        for fusion in fusions:
            fp32[fusion] = write_graph(job, fusion, work / fusion)
            int8[fusion], choices[fusion] = quantize_most_accurate(fp32[fusion], calibration, settings)
        fusion, timings = pick_int8_fusion(int8, calibration.inputs)
        gate = accuracy_gate(calibration.accuracy_of(fp32[fusion]), calibration.accuracy_of(int8[fusion]), settings,
                             splits=calibration.splits)
        meta = job.metadata(fusion, "int8", {**gate.metadata_extra(), "int8_reduce_range": str(choices[fusion]["reduce_range"]),
                                             "int8_calibration": f"{settings.calib_method}:{len(calibration.inputs)}"})
        stamp_metadata(int8[fusion], meta)
        report = write_report(work, {
            "precision": "int8", "fusion": fusion, "fusion_timings_s": timings, "gate": gate.to_dict(), **choices[fusion],
            "calibration": {"method": settings.calib_method, "images": len(calibration.inputs), "class_balanced": True},
            "splits": calibration.splits,
            "fp32_nodes": fp32_nodes(onnx.load(str(fp32[fusion]))), "checkpoint": str(job.request.ckpt)})
        return publish(job, "onnxruntime_onnx", serving, {"model.onnx": int8[fusion], "export_report.json": report},
                       fusion, meta)[0]


class TensorRTInt8:
    """export.trt --int8: the same quantization with symmetric INT8 activations (TensorRT's explicit-quantization
    input; the plan is built strongly typed, so neither TRT 10 nor TRT 11 needs a precision flag), and the same
    gate, run on the built plan against the FP32 graph."""

    def __init__(self, job: ExportJob, settings: Int8Settings, labelled: LabelledData):
        self.job, self.settings = job, settings
        self.calibration = Calibration.load(job, settings, labelled)

    def quantize(self, fp32: Path) -> Path:
        rr = self.settings.reduce_range == "on"  # 7-bit weights only help CPUs without VNNI
        return quantize_graph(fp32, fp32.with_name("int8-trt.onnx"), self.calibration.inputs, self.settings.calib_method,
                              rr, symmetric_activations=True)

    def gate(self, run: Callable[[np.ndarray], np.ndarray], fp32: Path, batch: int) -> GateResult:
        inputs = self.calibration.data.inputs(self.calibration.layout)
        logits = np.concatenate([run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
        return accuracy_gate(self.calibration.accuracy_of(fp32), self.calibration.accuracy(logits), self.settings,
                             splits=self.calibration.splits)
