"""One stage's optimizer and loader, the training step (one batch) and one epoch of it.

`TrainStep` is the single definition of a training step: the epoch loop runs it per batch and
`python -m bench.train_step` times it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from expertfuse.errors import UserError
from train.methods.base import Method
from train.schedule import Stage, lr_factor
from train.training.distributed import Distributed, average_gradients


def trainable_aux(method: Method) -> list[nn.Parameter]:
    """The method's training-only parameters that train now (DDP does not see them)."""
    return [p for p in method.aux.parameters() if p.requires_grad] if method.aux is not None else []


def build_optimizer(cfg, model: nn.Module, method: Method, stage: Stage):
    """A fresh SGD and its LR schedule over what trains in this stage (a stage may freeze or replace parts)."""
    params = [p for p in model.parameters() if p.requires_grad] + trainable_aux(method)
    opt = torch.optim.SGD(params, lr=stage.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(stage, e))


def build_loader(cfg, dataset, method: Method, stage: Stage, generator: torch.Generator, env: Distributed):
    """(sampler, loader) of a stage: its own sampler (e.g. class-aware), batch size and views."""
    batch = stage.batch_size or cfg.batch_size
    sampler = method.sampler(stage, dataset.targets, generator, env.rank, env.world)
    if sampler is None:
        sampler = DistributedSampler(dataset, env.world, env.rank, shuffle=True, seed=cfg.seed) \
            if env.world > 1 else RandomSampler(dataset, generator=generator)
    return sampler, DataLoader(dataset, batch, sampler=sampler, num_workers=cfg.workers,
                               pin_memory=env.device.type == "cuda", generator=generator,
                               drop_last=cfg.drop_last and len(dataset) > batch * env.world,
                               persistent_workers=cfg.workers > 0)


@dataclass
class TrainStep:
    """One optimizer step of a method on one batch: forward under autocast, backward through the grad
    scaler, the training-only parameters' gradients averaged over ranks, the method's after-step hook."""

    model: nn.Module  # what the loss runs (DDP-wrapped under torchrun)
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype, None for full precision
    channels_last: bool = False
    world: int = 1

    def to_device(self, images, targets):
        """A batch on the device (a list of views stays a list), channels_last when asked."""
        images = [self._move(v) for v in images] if isinstance(images, list) else self._move(images)
        return images, targets.to(self.device, non_blocking=True)

    def _move(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def __call__(self, images, targets) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, per-expert logits, named loss parts) of the step; `targets` must be on the device."""
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, logits, parts = self.method.loss(self.model, images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        average_gradients(trainable_aux(self.method), self.world)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(self.model)
        return loss, logits, parts


class EpochSums:
    """Sample-weighted sums of an epoch's loss, loss parts and correct predictions, kept on the device so a
    training step never waits for them: read() and check_finite() are the only syncs."""

    CHECK_EVERY = 50  # steps between finiteness checks (and at the end of every epoch)

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0

    def add(self, batch_means: dict[str, torch.Tensor], n: int) -> None:
        self.seen += n
        for name, value in batch_means.items():
            total = value.detach().float() * n
            self.sums[name] = self.sums[name] + total if name in self.sums else total

    def read(self) -> dict[str, float]:
        return {name: float(v) for name, v in self.sums.items()}

    def check_finite(self, env: Distributed) -> None:
        """Stop training once the loss is not finite, on every rank at the same step (a collective under DDP,
        so no rank is left waiting in the next gradient all-reduce)."""
        loss = self.sums.get("loss", torch.zeros((), device=env.device))
        if env.all_reduce((~torch.isfinite(loss)).float().reshape(1)).item():
            value = float(loss) if not torch.isfinite(loss) else "non-finite on another rank"
            raise UserError(f"loss became {value} in epoch {self.epoch + 1}; lower --lr or check the data")


def train_one_epoch(step: TrainStep, loader, epoch: int, desc: str, env: Distributed) -> dict:
    """Run the step over the loader once; the epoch's log row (means per image, throughput, LR used)."""
    lr = step.optimizer.param_groups[0]["lr"]
    sums, started = EpochSums(epoch), time.perf_counter()
    shown = started
    bar = tqdm(loader, desc=desc, disable=not env.main, leave=True, dynamic_ncols=True, mininterval=1.0)
    for index, (images, targets) in enumerate(bar, start=1):
        images, targets = step.to_device(images, targets)
        loss, logits, parts = step(images, targets)
        accuracy = (logits.detach().float().mean(1).argmax(1) == targets).float().mean()
        sums.add({"loss": loss, **parts, "acc": accuracy}, len(targets))
        if index % sums.CHECK_EVERY == 0:
            sums.check_finite(env)
        now = time.perf_counter()
        if env.main and now - shown >= 1.0:  # reading the sums waits for the device: once a second
            shown = now
            bar.set_postfix(loss=f"{sums.read()['loss'] / sums.seen:.3f}", lr=f"{lr:.4g}",
                            img_s=f"{sums.seen * env.world / (now - started):.0f}")
    sums.check_finite(env)
    seconds = time.perf_counter() - started
    row = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v / max(sums.seen, 1) for k, v in sums.read().items()},
           "images_per_s": sums.seen * env.world / seconds, "seconds": seconds}
    row["train_acc"] *= 100
    return row
