"""Measure: the runners (torch, ONNX Runtime, TensorRT, Triton), the labelled evaluation, in-process timing and the
served sweep, and the machine they ran on. Nothing here decides or reports; bench.decide and bench.report do."""
