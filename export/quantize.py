"""INT8 post-training quantization of the exported graph, calibrated and gated by accuracy.

  python -m export.onnx --ckpt runs/ncl/ncl.pt --int8 [--calib-images 512] [--calib-method minmax|entropy|percentile]
      [--reduce-range auto|on|off] [--max-overall-drop 0.5] [--max-few-drop 1.0] [training data flags]

Static quantization with onnxruntime.quantization (quant_pre_process, then quantize_static in QDQ
format, per-channel symmetric INT8 weights), calibrated on training images sampled class-balanced so
the tail classes shape the activation ranges. The stem convolutions (3 input channels: under 1% of
the FLOPs, and they see the raw image) and the linear heads (tiny, and they write the logits whose
small margins decide the tail classes) stay FP32. Without VNNI, ORT's U8S8 kernels can saturate, so
`--reduce-range auto` quantizes with 7-bit weights and without and keeps the more accurate. The
gate runs on the labelled evaluation set before anything is written: overall top-1 may drop at most
--max-overall-drop points and few-shot top-1 at most --max-few-drop points against FP32, else the
export exits 1 (ParityError) and the repository stays as it was.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                      quantize_static)

from expertfuse.contract import INPUT, LOGITS, ModelMetadata
from expertfuse.errors import ParityError, UserError
from expertfuse.preprocess import to_model_input
from expertfuse.timing import pick_fastest
from export.common import ExportJob, print_summary, serving_options, signature
from export.labelled import (LabelledSet, accuracy_table, add_data_args, calibration_pixels, evaluation_set, load_bundle,
                             shot_accuracy)
from serve.repository import RepositoryError, TensorSpec, model_config, write_model

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
CALIB_BATCH = 32


def add_int8_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("INT8 (static quantization, QDQ)")
    group.add_argument("--int8", action="store_true", help="INT8 QDQ graph, calibrated and accuracy-gated")
    group.add_argument("--calib-images", type=int, default=512, help="calibration images, class-balanced [512]")
    group.add_argument("--calib-method", choices=sorted(CALIBRATION_METHODS), default="minmax", help="[minmax]")
    group.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                       help="7-bit weights (no-VNNI CPUs); auto keeps the more accurate [auto]")
    group.add_argument("--max-overall-drop", type=float, default=0.5, help="gate: top-1 points vs FP32 [0.5]")
    group.add_argument("--max-few-drop", type=float, default=1.0, help="gate: few-shot top-1 points vs FP32 [1.0]")
    add_data_args(p)


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
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), PixelReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    calibrate_method=CALIBRATION_METHODS[method], nodes_to_exclude=fp32_nodes(onnx.load(str(pre))),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric_activations})
    pre.unlink()
    return out


def cpu_session(model: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([sess.run([LOGITS], {INPUT: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def accuracy_of(model: Path | bytes, data: LabelledSet, layout: str) -> dict[str, float]:
    logits = run_logits(cpu_session(model), data.inputs(layout))
    return shot_accuracy(logits.argmax(1), data.labels, data.train_counts, data.shot_rule)


def reduce_range_options(choice: str) -> list[bool]:
    return {"auto": [False, True], "on": [True], "off": [False]}[choice]


def quantize_most_accurate(fp32: Path, calib: np.ndarray, data: LabelledSet, layout: str,
                           args: argparse.Namespace) -> tuple[Path, dict]:
    """Quantize with each reduce-range choice and keep the most accurate (overall, then few-shot)."""
    tried = {}
    for rr in reduce_range_options(args.reduce_range):
        path = quantize_graph(fp32, fp32.with_name(f"int8-rr{int(rr)}.onnx"), calib, args.calib_method, rr)
        tried[rr] = (path, accuracy_of(path, data, layout))
    best = max(tried, key=lambda rr: (tried[rr][1]["overall"], np.nan_to_num(tried[rr][1]["few"])))
    return tried[best][0], {"reduce_range": best,
                            "accuracy_by_reduce_range": {("on" if rr else "off"): acc for rr, (_, acc) in tried.items()}}


@dataclass
class GateResult:
    fp32: dict[str, float]
    int8: dict[str, float]
    max_overall_drop: float
    max_few_drop: float

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
                "fp32": self.fp32, "int8": self.int8}

    def triton_extra(self) -> dict[str, str]:
        return {"int8_gate": "passed" if self.passed else "refused", "int8_top1_drop": f"{self.overall_drop:.3f}",
                "int8_few_top1_drop": f"{self.few_drop:.3f}", "int8_top1": f"{self.int8['overall']:.3f}"}


def accuracy_gate(fp32: dict, int8: dict, args: argparse.Namespace, what: str = "INT8") -> GateResult:
    """Print the per-shot-group table; raise ParityError when the INT8 graph loses more than the flags allow."""
    gate = GateResult(fp32, int8, args.max_overall_drop, args.max_few_drop)
    print(f"accuracy gate on the labelled evaluation set (top-1 %):\n"
          + accuracy_table({"fp32": fp32, what.lower(): int8}))
    if not gate.passed:
        raise ParityError(f"{what} refused: top-1 drops {gate.overall_drop:.2f} points (limit {gate.max_overall_drop:g}), "
                          f"few-shot {gate.few_drop:.2f} points (limit {gate.max_few_drop:g}); nothing written")
    print(f"{what} gate passed: top-1 {-gate.overall_drop:+.2f}, few-shot {-gate.few_drop:+.2f} points")
    return gate


def model_metadata(job: ExportJob, fusion: str, precision: str, extra: dict[str, str]) -> ModelMetadata:
    s = job.spec
    return ModelMetadata(classes=list(job.checkpoint["classes"]), mean=list(s.mean), std=list(s.std),
                         input_size=s.input_size, resize=s.resize, input_layout=job.opts.input_layout,
                         experts=list(job.opts.experts), fusion=fusion, precision=precision, arch=s.arch,
                         method=job.checkpoint["method"], checkpoint_sha256=job.checkpoint_sha256, extra=extra)


def write_to_repository(job: ExportJob, model_file: Path, meta: ModelMetadata, report: dict,
                        extra_outputs: list[TensorSpec] = ()) -> Path:
    """Stamp the metadata into the graph and add it, its report and config to the repository."""
    proto = onnx.load(str(model_file))
    del proto.metadata_props[:]
    for key, value in meta.to_properties().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(model_file))
    onnx.checker.check_model(str(model_file))
    inputs, outputs = signature(job)
    outputs = outputs + list(extra_outputs)
    cfg = model_config(job.name, "onnxruntime_onnx", inputs, outputs, serving_options(job.args, job.args.max_batch),
                       meta.triton_parameters())
    report_file = model_file.with_name("export_report.json")
    report_file.write_text(json.dumps(report, indent=2, default=float))
    try:
        model_dir, version = write_model(job.args.out, cfg, {"model.onnx": model_file, "export_report.json": report_file},
                                         job.checkpoint["classes"], overwrite=job.args.overwrite)
    except RepositoryError as exc:
        raise UserError(str(exc)) from None
    print_summary(model_dir, version, inputs, outputs, meta.fusion)
    return model_dir


def export_int8(job: ExportJob, export_graph) -> Path:
    """Quantize the fused graph (loop or grouped, chosen by measurement), gate it, and only then write it.
    `export_graph(job, fusion, folder)` writes the FP32 graph (export.onnx's exporter)."""
    args = job.args
    if job.opts.fp16 or args.naive_ensemble:
        raise UserError("--int8 quantizes the FP32 fused graph; drop --fp16 / --naive-ensemble")
    bundle = load_bundle(job.checkpoint, args)
    data = evaluation_set(bundle, job.checkpoint, job.spec, args)
    layout = job.opts.input_layout
    calib = to_model_input(calibration_pixels(bundle, job.spec, args.calib_images), layout)
    print(f"INT8: {len(calib)} class-balanced calibration images ({args.calib_method}), "
          f"{len(data.labels)} labelled evaluation images")
    fusions = ["loop", "grouped"] if job.opts.fusion == "auto" else [job.opts.fusion]
    with tempfile.TemporaryDirectory(prefix="expertfuse-int8-") as tmp:
        work, candidates = Path(tmp), {}
        for fusion in fusions:
            fp32 = export_graph(job, fusion, work / fusion)
            int8, choice = quantize_most_accurate(fp32, calib, data, layout, args)
            candidates[fusion] = (fp32, int8, choice)
        fusion, timings = pick_int8_fusion(candidates, calib)
        fp32, int8, choice = candidates[fusion]
        gate = accuracy_gate(accuracy_of(fp32, data, layout), accuracy_of(int8, data, layout), args)
        meta = model_metadata(job, fusion, "int8", {**gate.triton_extra(), "int8_reduce_range": str(choice["reduce_range"]),
                                                    "int8_calibration": f"{args.calib_method}:{len(calib)}"})
        report = {"precision": "int8", "fusion": fusion, "fusion_timings_s": timings, "gate": gate.to_dict(), **choice,
                  "calibration": {"method": args.calib_method, "images": len(calib), "class_balanced": True},
                  "fp32_nodes": fp32_nodes(onnx.load(str(fp32))), "onnxruntime": ort.__version__,
                  "checkpoint": str(args.ckpt)}
        return write_to_repository(job, int8, meta, report)


def pick_int8_fusion(candidates: dict, calib: np.ndarray) -> tuple[str, dict]:
    """The INT8 fusion ONNX Runtime runs fastest here (batch 1 and 32), measured interleaved."""
    if len(candidates) == 1:
        return next(iter(candidates)), {}
    runners = {f: (lambda x, s=cpu_session(int8): s.run([LOGITS], {INPUT: x})) for f, (_, int8, _) in candidates.items()}
    best, timings = pick_fastest(runners, {1: calib[:1], 32: calib[:32]})
    print("INT8 fusion: " + "; ".join(f"{f} " + ", ".join(f"b{b} {t * 1e3:.2f} ms" for b, t in per.items())
                                      for f, per in timings.items()) + f" -> {best}")
    return best, timings


class TensorRTInt8:
    """export.trt --int8: the same quantization with symmetric INT8 activations (TensorRT's explicit-quantization
    input; the plan is built strongly typed, so neither TRT 10 nor TRT 11 needs a precision flag), and the same
    gate, run on the built plan against the FP32 graph."""

    def __init__(self, job: ExportJob):
        bundle = load_bundle(job.checkpoint, job.args)
        self.job, self.data = job, evaluation_set(bundle, job.checkpoint, job.spec, job.args)
        self.calib = to_model_input(calibration_pixels(bundle, job.spec, job.args.calib_images), job.opts.input_layout)

    def quantize(self, fp32: Path) -> Path:
        rr = self.job.args.reduce_range == "on"  # 7-bit weights only help CPUs without VNNI
        return quantize_graph(fp32, fp32.with_name("int8-trt.onnx"), self.calib, self.job.args.calib_method, rr,
                              symmetric_activations=True)

    def gate(self, run, fp32: Path) -> dict:
        inputs = self.data.inputs(self.job.opts.input_layout)
        batch = self.job.args.max_batch
        logits = np.concatenate([run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
        got = shot_accuracy(logits.argmax(1), self.data.labels, self.data.train_counts, self.data.shot_rule)
        return accuracy_gate(accuracy_of(fp32, self.data, self.job.opts.input_layout), got, self.job.args).to_dict()
