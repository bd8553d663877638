"""ONNX Runtime session options for every session the project runs its graphs in outside Triton (export gates,
`--fusion auto`, INT8 calibration and gates, the bench's runners; the bundled Triton's python backend,
serve/backends/onnx_model.py, is copied into model repositories and keeps ONNX Runtime's default)."""
from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int = 0) -> ort.SessionOptions:
    """`threads` intra-op threads (0: ONNX Runtime's default, one per core), idle ones sleeping instead of spinning:
    on a shared CPU a spinning pool fights the other load for cores, which slows small calls more than large ones,
    so it moves the latency ratios `--fusion auto` and the bench decide on, and burns the cores other work needs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
