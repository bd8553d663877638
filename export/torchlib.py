"""torch.onnx's registry of torchlib functions, built once per process: torch.onnx builds it anew for every export,
re-parsing the source of ~500 onnxscript functions (~0.5 s here: a third of a small graph's export). A command that
exports several graphs (auto's two fusions, the naive ensemble's experts, the early-exit stages, the bench's
variants) builds it once per opset. Its own module, never run as __main__, so that one cache serves the process."""
from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_patching = threading.Lock()  # exports in threads take turns: the builder patched and restored as one


@contextmanager
def torchlib_registry_built_once() -> Iterator[None]:
    """While torch.onnx exports: its registry builder answers from the cache. An export without a custom translation
    table, as ours are, only reads the registry. Where torch's internals differ (another module, another signature),
    nothing is patched and each export builds its own as before."""
    with _patching:
        try:
            from torch.onnx._internal.exporter._registration import ONNXRegistry
            build = ONNXRegistry.__dict__["from_torchlib"]
            default_opset = inspect.signature(build.__func__).parameters["opset_version"].default
        except (ImportError, KeyError, AttributeError, TypeError, ValueError):
            yield
            return
        ONNXRegistry.from_torchlib = classmethod(
            lambda cls, opset_version=default_opset: torchlib_registry(build.__func__, cls, opset_version))
        try:
            yield
        finally:
            ONNXRegistry.from_torchlib = build


@functools.cache
def torchlib_registry(build, registry_class, opset_version: int):
    return build(registry_class, opset_version=opset_version)
