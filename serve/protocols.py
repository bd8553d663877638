"""The tritonclient module that speaks a protocol, imported on first use and without torch: the bench's
spawned load-generator processes import only this and tritonclient."""
from __future__ import annotations

import importlib

from expertfuse.contract import INPUT

PROTOCOLS = ("http", "grpc")


def client_module(protocol: str, asyncio: bool = False):
    """tritonclient.http or tritonclient.grpc (their .aio forms with asyncio); ValueError for anything else."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}" + (".aio" if asyncio else ""))


def ready_model_names(client, protocol: str) -> list[str]:
    """The READY models of a server's repository index (HTTP gives dicts, gRPC messages)."""
    index = client.get_model_repository_index()
    entries = index.models if protocol == "grpc" else index
    return [m["name"] if isinstance(m, dict) else m.name for m in entries
            if (m.get("state") if isinstance(m, dict) else m.state) == "READY"]


def model_config_dict(client, protocol: str, model: str, version: str = "") -> dict:
    """A served model's config as HTTP's JSON gives it, over either protocol."""
    cfg = client.get_model_config(model, version)
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict
        cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
    return cfg


def image_inputs(module, batches: list, with_data: bool = True) -> list:
    """One image input per batch (UINT8 for uint8 pixels, else FP32) of `module`'s client, its data set unless the
    caller passes the tensors another way (shared memory)."""
    inputs = []
    for images in batches:
        request = module.InferInput(INPUT, list(images.shape), "UINT8" if images.dtype.name == "uint8" else "FP32")
        if with_data:
            request.set_data_from_numpy(images)
        inputs.append(request)
    return inputs
