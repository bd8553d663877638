"""The bundled Triton (from the nvidia-pytriton wheel): where it is, and the runtime repository it serves.

That server has only the python backend. `runtime_repository()` mirrors a model repository into a
temporary one where every onnxruntime_onnx model becomes a python-backend model with the same name,
inputs, outputs, labels, batching and warmup, running the same model.onnx (symlinked) with
onnxruntime. TensorRT plans are refused: they need the NGC container's tensorrt backend.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from serve.backends import ONNX_MODEL
from serve.repository import LABELS_FILE, RepositoryError, model_folders, read_config, versions, write_config


def bundled_root() -> Path | None:
    """pytriton/tritonserver inside site-packages, if nvidia-pytriton is installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def backend_directory(root: Path, into: Path) -> Path:
    """A private backend folder of symlinks with the stub for this interpreter's Python version
    (symlinks keep the binaries' $ORIGIN-relative RPATHs working and leave the venv untouched)."""
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise RepositoryError(f"the bundled Triton has no python-backend stub for Python {sys.version_info.major}."
                              f"{sys.version_info.minor}")
    python = into / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(root / "backends" / "python" / name)
    (python / "triton_python_backend_stub").symlink_to(stub)
    return into


def server_environment() -> dict[str, str]:
    """The stub finds numpy/onnxruntime through `python3` on PATH (PYTHONPATH is ignored) and needs this
    interpreter's libpython."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def gpu_visible() -> bool:
    return Path("/dev/nvidiactl").exists()


def runtime_repository(source: Path, into: Path) -> list[str]:
    """Mirror `source` into `into` for the python-backend-only server. Returns notes on what changed."""
    notes = []
    for model_dir in model_folders(source):
        cfg = read_config(model_dir)
        target = into / model_dir.name
        if cfg.platform == "tensorrt_plan" or cfg.backend == "tensorrt":
            raise RepositoryError(f"model {cfg.name!r} is a TensorRT plan; the bundled server has only the python "
                                  "backend: serve it with --server local or docker (NGC Triton container)")
        if cfg.platform == "onnxruntime_onnx" or cfg.backend == "onnxruntime":
            cfg.ClearField("platform")
            cfg.backend = "python"
            cfg.optimization.ClearField("execution_accelerators")
            if not gpu_visible():
                for group in cfg.instance_group:
                    if group.kind == group.KIND_GPU:
                        group.kind = group.KIND_CPU
                        group.ClearField("gpus")
                        notes.append(f"{cfg.name}: no GPU visible, instances run on CPU")
            target.mkdir(parents=True)
            for v in versions(model_dir):
                (target / str(v)).mkdir()
                (target / str(v) / "model.onnx").symlink_to((model_dir / str(v) / "model.onnx").resolve())
                shutil.copy(ONNX_MODEL, target / str(v) / "model.py")
            write_config(target, cfg)
            if (model_dir / LABELS_FILE).is_file():
                (target / LABELS_FILE).symlink_to((model_dir / LABELS_FILE).resolve())
        else:  # python models and ensembles run as they are
            target.symlink_to(model_dir.resolve(), target_is_directory=True)
    return notes
