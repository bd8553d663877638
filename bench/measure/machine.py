"""What a result was measured on: CPU, cores, GPU, driver, package versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "tritonclient", "nvidia-pytriton",
            "tensorrt", "numpy")


def describe_machine(m: dict) -> str:
    """A report's machine line from machine_info(): 'AMD EPYC (2 cores), GPU: none'."""
    return f"{m['cpu']} ({m['cores']} cores), GPU: {m['gpu'] or 'none'}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi(field: str) -> str | None:
    """One --query-gpu field of the first GPU from nvidia-smi, or None (no tool, no driver, no GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def cuda_driver_version() -> str | None:
    """The installed NVIDIA driver (not the CUDA version torch was built with): pynvml, else nvidia-smi, else None."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no pynvml or no driver: try nvidia-smi
        pass
    return nvidia_smi("driver_version")


def machine_info() -> dict:
    """The machine and package versions; torch's own facts (threads, CUDA build) only where this process ran torch:
    bench.tune drives Triton and never imports it (2 s of CPU per run on a 2-core machine)."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None,
            "cuda_driver": cuda_driver_version(), "packages": {}}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch_threads=torch.get_num_threads(), cuda_build=torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    elif info["cuda_driver"]:
        info["gpu"] = nvidia_smi("name")
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info
