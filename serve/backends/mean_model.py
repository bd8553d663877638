"""Triton python-backend model: the averaging step of the naive (unfused) ensemble.

Inputs logits_0 .. logits_{K-1} (one per expert model), output `logits` = their mean.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            stacked = np.stack([pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs])
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", stacked.mean(0))]))
        return responses
