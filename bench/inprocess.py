"""In-process measurement: single expert vs fused ensemble on torch, ONNX Runtime and TensorRT, per batch size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.runners import OrtRunner, Runner, TensorRTRunner, TorchRunner
from expertfuse.timing import measure
from export.common import job_for
from export.graph import InferenceGraph, reference_logits
from export.onnx import export_graph, onnx_file

# variant -> (experts, fusion): what the product compares
VARIANTS = {"single": ("0", "loop"), "ensemble-loop": ("all", "loop"), "ensemble-grouped": ("all", "grouped")}
PARITY_ATOL = 1e-3
# FP16 graphs: a sanity gate against a wrong model (which agrees about 1/C of the time), not export's precision gate.
PARITY_FP16_TOP1 = 0.9


def available_runtimes() -> list[str]:
    runtimes = ["torch-cpu", "onnxruntime-cpu"]
    if torch.cuda.is_available():
        runtimes += ["torch-cuda", "torch-cuda-cudagraphs"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runtimes.append("onnxruntime-cuda")
        if "TensorrtExecutionProvider" in ort.get_available_providers():
            runtimes.append("onnxruntime-tensorrt")
        try:
            import tensorrt  # noqa: F401
            runtimes.append("tensorrt")
        except ImportError:
            pass
    return runtimes


def make_runner(runtime: str, job, fusion: str, workdir: Path) -> Runner:
    if runtime.startswith("torch"):
        device = "cuda" if "cuda" in runtime else "cpu"
        return TorchRunner(InferenceGraph(job.model, job.opts), device, cuda_graphs=runtime.endswith("cudagraphs"))
    onnx_path = workdir / f"{'_'.join(map(str, job.opts.experts))}-{fusion}"
    if not (onnx_path / "model.onnx").exists():
        export_graph(job, fusion, onnx_path, 18)
    if runtime.startswith("onnxruntime"):
        return OrtRunner(onnx_file(onnx_path / "model.onnx"), runtime.split("-", 1)[1])
    if runtime == "tensorrt":
        from export.trt import build_plan, require_tensorrt
        size = job.spec.input_size
        plan = onnx_path / "model.plan"
        plan.write_bytes(build_plan(require_tensorrt(), onnx_file(onnx_path / "model.onnx"), (size, size, 3),
                                    (1, 32, 256), False, 4.0, None, False))
        return TensorRTRunner(plan)
    raise ValueError(f"unknown runtime {runtime!r}; available: {', '.join(available_runtimes())}")


def parity_images(size: int, count: int) -> np.ndarray:
    """The fixed random uint8 NHWC images every runner is checked on before it is timed."""
    return np.random.RandomState(7).randint(0, 256, (count, size, size, 3), dtype=np.uint8)


def check_parity(runner: Runner, model, experts: tuple[int, ...], images: np.ndarray, fp16: bool = False) -> dict:
    """Compare a runner with the PyTorch FP32 reference; bench refuses to time a runner that disagrees.
    FP32: max|diff| <= PARITY_ATOL and identical top-1; FP16: top-1 agreement >= PARITY_FP16_TOP1."""
    ref = reference_logits(model, experts, torch.from_numpy(images), "uint8-nhwc").numpy()
    got = runner.logits(images)
    diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    ok = top1 >= PARITY_FP16_TOP1 if fp16 else diff <= PARITY_ATOL and top1 == 1.0
    return {"max_abs_diff": diff, "top1_agreement": top1, "ok": ok}


def sweep(runner: Runner, image_size: int, batches: list[int], window_s: float, tolerance: float = 0.1) -> list[dict]:
    """Median/p90/p99 latency and images/s per batch, rotating four input buffers (no cache effects)."""
    rows, rng = [], np.random.RandomState(0)
    for batch in batches:
        buffers = [runner.prepare(rng.randint(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8))
                   for _ in range(4)]
        m = measure(lambda i: runner.run(buffers[i % len(buffers)]), warmup=3, window_s=window_s, tolerance=tolerance)
        rows.append({"batch": batch, **m.summary(batch)})
    return rows


def run_inprocess(ckpt: Path, runtimes: list[str], batches: list[int], window_s: float, workdir: Path,
                  log=print) -> list[dict]:
    """Every (variant, runtime) pair: parity first, then the batch sweep. One row per (variant, runtime, batch)."""
    rows = []
    for variant, (experts, fusion) in VARIANTS.items():
        job = job_for(ckpt, experts, fusion)
        size = job.spec.input_size
        images = parity_images(size, 8)
        for runtime in runtimes:
            runner = make_runner(runtime, job, fusion, workdir)
            try:
                parity = check_parity(runner, job.model, job.opts.experts, images)
                base = {"variant": variant, "runtime": runtime, "experts": len(job.opts.experts), "fusion": fusion,
                        "parity_max_abs_diff": parity["max_abs_diff"], "threads": torch.get_num_threads()}
                if not parity["ok"]:
                    log(f"  {variant:>16} {runtime:<22} REFUSED: parity max|diff| {parity['max_abs_diff']:.2e}, "
                        f"top-1 {100 * parity['top1_agreement']:.1f}%")
                    rows.append({**base, "refused": "parity"})
                    continue
                for row in sweep(runner, size, batches, window_s):
                    rows.append({**base, **row})
                    log(f"  {variant:>16} {runtime:<22} batch {row['batch']:>4}: p50 {row['p50_ms']:8.2f} ms  "
                        f"{row['items_per_s']:9.1f} img/s{'' if row['stable'] else '  (unstable)'}")
            finally:
                runner.close()
    return rows
