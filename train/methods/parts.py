"""Training-only parts several methods share: projection MLP, EMA (momentum) encoder update, feature queue,
BatchNorm freezing, DDP unwrapping and the all-gather of keys. One place each, so NCL, ECL and SSD build
their contrastive branches from the same pieces and SHIKE and SSD freeze BatchNorm the same way."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself when not wrapped)."""
    return getattr(model, "module", model)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order (x itself without torch.distributed): queues hold every
    rank's keys, as MoCo's concat_all_gather."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def projection_mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    """MoCo-v2's projection head: Linear(d, d) - ReLU - Linear(d, dim_out)."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))


@torch.no_grad()
def ema_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """key <- momentum * key + (1 - momentum) * query, parameter by parameter (buffers keep their own values).
    Applying it n times with the same query equals one update with momentum ** n."""
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(momentum).add_(pq.detach(), alpha=1 - momentum)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: its running statistics stop updating (gradients are unaffected)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class FeatureQueue(nn.Module):
    """MoCo's queue of past keys: `slots` ring buffers (NCL keeps one per expert) of `size` unit vectors,
    optionally with each key's label (SSD masks same-class negatives). Buffers: queue [slots, size, dim],
    queue_ptr [slots] and, with `label_fill`, queue_labels [slots, size] filled with that label."""

    def __init__(self, slots: int, size: int, dim: int, label_fill: int | None = None):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(slots, size, dim), dim=2))
        self.register_buffer("queue_ptr", torch.zeros(slots, dtype=torch.long))
        if label_fill is not None:
            self.register_buffer("queue_labels", torch.full((slots, size), label_fill, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, slot: int, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Overwrite the oldest entries of one slot with every rank's keys (and labels), wrapping around."""
        keys = all_gather(keys)
        size, ptr = self.queue.shape[1], int(self.queue_ptr[slot])
        index = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[slot, index] = keys.to(self.queue.dtype)
        if labels is not None:
            self.queue_labels[slot, index] = all_gather(labels)
        self.queue_ptr[slot] = (ptr + len(keys)) % size
