"""The float32 export gate on seeds 0-6 of 3 x ResNet-32 / 100 classes (random weights, trained-like BatchNorm
statistics): the verdict of each fusion, as the default export judges it (batches 1, 2, 7, 64; random and
real-looking images). Run from the repository root: python bench/results/real-size-cpu/gate_seeds.py"""
import contextlib
import io
import tempfile
from pathlib import Path

from bench.real_size import preset_checkpoint
from export.gate import check_parity
from export.job import LoadedCheckpoint, job_for
from export.onnx import export_graph, onnx_file, onnx_runner

with tempfile.TemporaryDirectory() as tmp:
    for seed in range(7):
        ckpt = LoadedCheckpoint.load(preset_checkpoint("ncl-cifar100-lt", Path(tmp) / f"s{seed}.pt", seed=seed))
        for experts, fusion in (("all", "grouped"), ("all", "loop"), ("0", "loop")):
            job = job_for(ckpt, experts, fusion, max_batch=64)
            run = onnx_runner(onnx_file(export_graph(job, fusion, Path(tmp) / f"{seed}{fusion}{experts}", 18)))
            with contextlib.redirect_stdout(io.StringIO()):
                rows = check_parity(job, run, [1, 2, 7, 64])  # raises ParityError if refused
            print(f"| {seed} | {experts} | {fusion} | {max(r['ratio'] for r in rows):.2f} | "
                  f"{max(r['max_rel_excess'] for r in rows):.2f} | {max(r['max_abs_diff'] for r in rows):.2e} |",
                  flush=True)
