"""The tritonclient module that speaks a protocol, imported on first use and without torch: the bench's
spawned load-generator processes import only this and tritonclient."""
from __future__ import annotations

import importlib

PROTOCOLS = ("http", "grpc")


def client_module(protocol: str, asyncio: bool = False):
    """tritonclient.http or tritonclient.grpc (their .aio forms with asyncio); ValueError for anything else."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}" + (".aio" if asyncio else ""))
