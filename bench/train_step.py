"""python -m bench.train_step: training throughput (images/s) of one optimizer step of a method.

Times the training engine's own step (train.training.loop.TrainStep, with the engine's optimizer and AMP
choice) on batches already on the device. Default: NCL, 3 x ResNet-32, batch 64 of 32x32 images, CPU (CUDA
with AMP and channels_last when present). Writes bench/results/train_step_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.measure.machine import machine_info
from expertfuse.timing import measure
from expertfuse.cli import positive_float, positive_int, run_cli
from train.config import TrainConfig
from train.engine import amp_dtype
from train.methods import get_method
from train.models import ModelSpec, build_model
from train.training.loop import TrainStep, build_optimizer


def train_step_throughput(method: str, arch: str, experts: int, batch: int, classes: int, device: torch.device,
                          window_s: float) -> dict:
    cfg = TrainConfig(method=method, arch=arch, num_experts=experts, hcm_n=max(1, int(0.3 * classes)), lr=0.01)
    model = build_model(ModelSpec(arch=arch, num_classes=classes, num_experts=experts)).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = [max(1, int(500 * 0.01 ** (c / (classes - 1)))) for c in range(classes)]
    loss_fn = get_method(method)(cfg, model, counts).to(device)
    optimizer, _ = build_optimizer(cfg, model, loss_fn, loss_fn.stages()[0])
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    engine_step = TrainStep(model, loss_fn, optimizer, scaler, device, dtype, channels_last)
    batches = [engine_step.to_device(torch.randn(batch, 3, 32, 32), torch.randint(classes, (batch,)))
               for _ in range(4)]

    def step(i: int) -> None:
        engine_step(*batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss_fn.train_mode(model)
    m = measure(step, warmup=3, window_s=window_s)
    return {"method": method, "arch": arch, "experts": experts, "batch": batch, "device": str(device),
            "amp": str(dtype) if dtype else "off", **m.summary(batch)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__)
    p.add_argument("--method", default="ncl")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--experts", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--classes", type=positive_int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--window-s", type=positive_float, default=2.0, help="length of one timed window")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    result = train_step_throughput(a.method, a.arch, a.experts, a.batch_size, a.classes, torch.device(a.device), a.window_s)
    result["machine"] = machine_info()
    print(f"{a.method} {a.experts} x {a.arch}, batch {a.batch_size} on {result['machine']['gpu'] or result['machine']['cpu']}: "
          f"{result['items_per_s']:.0f} images/s (step p50 {result['p50_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms"
          f"{'' if result['stable'] else ', windows never agreed within 10%'})")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"train_step_{torch.device(a.device).type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
