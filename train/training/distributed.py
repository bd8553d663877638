"""torchrun's environment and the few collectives training needs (all no-ops in a single process)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Distributed:
    """torchrun's environment: rank, world size, device; single process when absent."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, value) -> list:
        """Every rank's `value`, in rank order (a one-element list in a single process)."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the training step runs: DDP-wrapped under torchrun, else the model itself."""
        return DistributedDataParallel(model) if self.world > 1 else model

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients of parameters DDP does not see (a method's training-only modules) over ranks."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
