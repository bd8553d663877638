"""Runners: one interface over every runtime bench can time.

  prepare(images) -> inputs placed where the runtime reads them (not timed)
  run(prepared)   -> one synchronized batch (timed)
  logits(images)  -> numpy logits (parity checks)

torch eager (CPU/CUDA, optional CUDA graphs); ONNX Runtime (CPU; CUDA with IO binding; TensorRT EP);
TensorRT plans (execute_async_v3 on CUDA buffers); Triton over HTTP or gRPC (optional system shared memory).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tritonclient.utils import InferenceServerException

from expertfuse.errors import UserError
from export.sessions import session_options
from serve.protocols import client_module, image_inputs


def cycling_calls(runners: dict[str, "Runner"], inputs: dict[str, list]) -> dict[str, Callable[[int], object]]:
    """Each runner as one of `interleave`'s variants: its call i runs its prepared input buffer i mod their number."""
    return {key: (lambda i, r=r, x=inputs[key]: r.run(x[i % len(x)])) for key, r in runners.items()}


class Runner:
    def prepare(self, images: np.ndarray):
        return images

    def prepare_all(self, batches: list[np.ndarray]) -> list:
        """Every batch a timing cycles through, prepared before the clock starts."""
        return [self.prepare(b) for b in batches]

    def run(self, prepared):
        raise NotImplementedError

    def to_numpy(self, output) -> np.ndarray:
        return np.asarray(output)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.to_numpy(self.run(self.prepare(images)))

    def close(self) -> None:
        pass


class TorchRunner(Runner):
    def __init__(self, graph: torch.nn.Module, device: str = "cpu", cuda_graphs: bool = False):
        self.device = torch.device(device)
        self.graph = graph.eval().to(self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._captured: dict[tuple, tuple] = {}

    def prepare(self, images):
        return torch.from_numpy(images).to(self.device)

    @torch.no_grad()
    def run(self, x):
        if self.cuda_graphs:
            return self._replay(x)
        out = self.graph(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def _replay(self, x):
        key = tuple(x.shape)
        if key not in self._captured:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.graph(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.graph(static_in)
            self._captured[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._captured[key]
        static_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        return static_out

    def to_numpy(self, output):
        return (output[0] if isinstance(output, tuple) else output).float().cpu().numpy()


class OrtRunner(Runner):
    def __init__(self, path: Path, provider: str = "cpu", threads: int = 0):
        providers = {"cpu": ["CPUExecutionProvider"],
                     "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[provider]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(f"onnxruntime lacks {missing[0]}")
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        self.provider = provider

    def prepare(self, images):
        if self.provider == "cpu":
            return images
        return ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)

    def run(self, prepared):
        if self.provider == "cpu":
            return self.session.run(["logits"], {"image": prepared})[0]
        binding = self.session.io_binding()  # IO binding: no host<->device copies in the timed call
        binding.bind_ortvalue_input("image", prepared)
        binding.bind_output("logits", "cuda")
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding

    def to_numpy(self, output):
        return output if isinstance(output, np.ndarray) else output.copy_outputs_to_cpu()[0]


class TensorRTRunner(Runner):
    def __init__(self, plan: Path):
        from export.trt import PlanRunner, require_tensorrt
        self.plan = PlanRunner(require_tensorrt(), Path(plan).read_bytes())

    def prepare(self, images):
        return torch.from_numpy(images).cuda()

    def run(self, x):
        return self.plan.run_device(x)

    def to_numpy(self, output):
        return output.cpu().numpy()


class TritonRunner(Runner):
    """One synchronous client (HTTP or gRPC); optional system shared memory for input and output."""

    def __init__(self, url: str, protocol: str, model: str, shared_memory: bool = False):
        self.module = client_module(protocol)
        self.client = self.module.InferenceServerClient(url)
        self.url, self.model, self.protocol, self.shared_memory = url, model, protocol, shared_memory
        self._regions: list[tuple[str, object]] = []

    def prepare(self, images):
        return self.prepare_all([images])[0]

    def prepare_all(self, batches: list[np.ndarray]) -> list:
        """One request per batch; with shared memory, all the batches in one input region (each request at its
        offset) and one output region they reuse, so a timing over hundreds of batches maps two regions, not
        hundreds."""
        if not self.shared_memory:
            output = self.module.InferRequestedOutput("logits")
            return [(request, output, None) for request in image_inputs(self.module, batches)]
        import tritonclient.utils.shared_memory as shm
        key = f"expertfuse_bench_{os.getpid()}_{id(self):x}_{len(self._regions)}"  # unique across runners
        classes = self._classes()
        region_in = self._region(f"{key}_in", sum(b.nbytes for b in batches))
        region_out = self._region(f"{key}_out", max(len(b) for b in batches) * classes * 4)
        shm.set_shared_memory_region(region_in, batches)
        prepared, offset = [], 0
        for images, request in zip(batches, image_inputs(self.module, batches, with_data=False)):
            output = self.module.InferRequestedOutput("logits")
            request.set_shared_memory(f"{key}_in", images.nbytes, offset)
            output.set_shared_memory(f"{key}_out", len(images) * classes * 4)
            prepared.append((request, output, (region_out, [len(images), classes])))
            offset += images.nbytes
        return prepared

    def _region(self, name: str, size: int):
        """A system shared-memory region of `size` bytes, registered with the server (close() unregisters it)."""
        import tritonclient.utils.shared_memory as shm
        region = shm.create_shared_memory_region(name, f"/{name}", size)
        try:
            self.client.register_system_shared_memory(name, f"/{name}", size)
        except InferenceServerException as exc:
            shm.destroy_shared_memory_region(region)
            raise UserError(f"Triton at {self.url} cannot map system shared memory ({exc.message()}): "
                            "--shared-memory needs the server on this host") from None
        self._regions.append((name, region))
        return region

    def max_batch(self) -> int:
        """The served model's max_batch_size (the largest request it accepts)."""
        cfg = self.client.get_model_config(self.model)
        value = cfg.config.max_batch_size if self.protocol == "grpc" else cfg.get("max_batch_size", 0)
        return max(1, int(value))

    def _classes(self) -> int:
        meta = self.client.get_model_metadata(self.model)
        outputs = meta["outputs"] if isinstance(meta, dict) else [{"shape": list(o.shape)} for o in meta.outputs]
        return int(outputs[0]["shape"][-1])

    def run(self, prepared):
        request, output, region = prepared
        result = self.client.infer(self.model, [request], outputs=[output])
        if region is None:
            return result.as_numpy("logits")
        import tritonclient.utils.shared_memory as shm
        return shm.get_contents_as_numpy(region[0], np.float32, region[1]).copy()  # no metadata call per request

    def close(self):
        """Unregister and free this runner's own regions only: other runners on the same server keep theirs."""
        import tritonclient.utils.shared_memory as shm
        for name, region in self._regions:
            self._unregister(name)
            shm.destroy_shared_memory_region(region)
        self.client.close()

    def _unregister(self, name: str, patience_s: float = 5.0) -> None:
        """Triton can still hold a region for a moment after the last response reached us (it answers 'currently in
        use'); wait for it that long rather than fail the run or leak the region."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return self.client.unregister_system_shared_memory(name)
            except InferenceServerException as exc:
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
