"""Triton python-backend model: runs this version's model.onnx with ONNX Runtime.

The bundled Triton has no onnxruntime backend, so `python -m serve` wraps every onnxruntime_onnx
model in this file. The dynamic batcher hands execute() a list of requests: their inputs are
concatenated into one ONNX Runtime run and the outputs split back, one response per request.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if os.path.isdir(path):  # external-data layout: model.onnx/model.onnx
            path = os.path.join(path, "model.onnx")
        options = ort.SessionOptions()
        params = config.get("parameters", {})
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", {}).get("string_value", "0") or 0)
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(f"{args['model_name']}: {path} on {self.session.get_providers()[0]}")

    def execute(self, requests):
        parts = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs}
        sizes = [len(a) for a in parts[self.inputs[0]]]
        feeds = {name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for name, arrays in parts.items()}
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:  # noqa: BLE001 - reported to every client of this batch
            error = pb_utils.TritonError(f"onnxruntime: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(r[start:start + n])) for name, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self):
        self.session = None
