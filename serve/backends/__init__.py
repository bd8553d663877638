"""Python-backend model.py files that the bundled server runs (copied into runtime repositories)."""
from pathlib import Path

ONNX_MODEL = Path(__file__).with_name("onnx_model.py")
MEAN_MODEL = Path(__file__).with_name("mean_model.py")
