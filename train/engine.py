"""The training loop: data, model, method, optimizer and schedule; evaluation; resume; DDP; AMP."""
from __future__ import annotations

import csv
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.data.datasets import DataOptions, build_data
from train.data.longtail import group_accuracy, shot_groups
from train.data.transforms import eval_transform, train_transform
from expertfuse.errors import UserError
from train.methods import get_method
from train.models import ModelSpec, build_model
from train.models.backbones import load_torchvision_weights
from train.schedule import Stage, lr_factor


class Views:
    """Several independent draws of the same augmentation (query/key views for contrastive branches)."""

    def __init__(self, transform, count: int):
        self.transform, self.count = transform, count

    def __call__(self, image):
        return [self.transform(image) for _ in range(self.count)]


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

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.amp not in ("bf16", "fp16"):
        raise UserError(f"--amp must be auto, bf16, fp16 or off, not {cfg.amp!r}")
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def build_spec(cfg: TrainConfig, data) -> ModelSpec:
    size = cfg.input_size or data.input_size
    fields = dict(arch=cfg.arch, num_classes=len(data.classes), num_experts=cfg.num_experts,
                  shared_stages=cfg.shared_stages, shortcut=cfg.shortcut, fusion=cfg.fusion, head=cfg.head,
                  head_scale=cfg.head_scale, input_size=size, resize=cfg.resize or max(data.resize, size),
                  mean=list(data.mean), std=list(data.std))
    return ModelSpec(**get_method(cfg.method).adapt_spec(fields))


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, env: Distributed, channels_last: bool = False) -> tuple:
    """Per-class correct counts of each expert and of the ensemble (mean of logits): ([K+1, C], [C])."""
    model.eval()
    correct, total = None, torch.zeros(num_classes, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        preds = torch.cat([logits.argmax(2), logits.mean(1).argmax(1, keepdim=True)], dim=1)  # [B, K+1]
        if correct is None:
            correct = torch.zeros(preds.shape[1], num_classes, dtype=torch.float64, device=device)
        hits = (preds == targets[:, None]).double()
        correct.index_add_(1, targets, hits.T)
        total += torch.bincount(targets, minlength=num_classes).double()
    return env.all_reduce(correct).cpu().numpy(), env.all_reduce(total).cpu().numpy()


def summarize(correct: np.ndarray, total: np.ndarray, train_counts: list[int], rule: str) -> dict:
    experts = [group_accuracy(correct[k], total, train_counts, rule) for k in range(len(correct) - 1)]
    return {"ensemble": group_accuracy(correct[-1], total, train_counts, rule), "experts": experts,
            "best_expert": int(np.argmax([e["overall"] for e in experts])), "test_images": int(total.sum()),
            "shot_rule": rule}


def format_metrics(m: dict) -> str:
    """One line; a shot group without classes (CIFAR-10-LT has no few-shot class) shows as '-'."""
    e = m["ensemble"]
    group = {name: "-" if np.isnan(e[name]) else f"{e[name]:.1f}" for name in ("many", "medium", "few")}
    experts = " ".join(f"{x['overall']:.1f}" for x in m["experts"])
    return (f"ensemble {e['overall']:.2f} (many {group['many']} / medium {group['medium']} / few {group['few']})"
            f"  experts {experts}")


class EpochSums:
    """Sample-weighted sums of an epoch's loss, loss parts and correct predictions, kept on the device so a
    training step never waits for them: read() and check_finite() are the only syncs."""

    CHECK_EVERY = 50  # steps between finiteness checks (and at the end of every epoch)

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, batch_means: dict[str, torch.Tensor], n: int) -> None:
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


class CsvLog:
    def __init__(self, path: Path, keep_epochs: int):
        self.path = path
        rows = []
        if keep_epochs and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
        self.rows = rows

    def append(self, row: dict) -> None:
        self.rows.append(row)
        fieldnames = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the path of the last checkpoint (<out>/<method>.pt)."""
    env = Distributed()
    try:
        return _train(cfg, env)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: Distributed) -> Path:
    device = env.device
    out = Path(cfg.out)
    last_path, best_path = out / f"{cfg.method}.pt", out / f"{cfg.method}_best.pt"
    method_cls = get_method(cfg.method)
    seed_everything(cfg.seed)

    data = build_data(DataOptions(**{k: getattr(cfg, k) for k in DataOptions.__dataclass_fields__ if hasattr(cfg, k)}))
    spec = build_spec(cfg, data)
    augment = train_transform(cfg.augment or data.augment, spec)
    data.test.transform = eval_transform(spec)

    model = build_model(spec)
    if cfg.pretrained:
        for module in ([model.trunk] if model.trunk is not None else []) + [e.backbone for e in model.experts]:
            load_torchvision_weights(module, cfg.arch)
    method = method_cls(cfg, model, data.train_counts)
    use_cuda = device.type == "cuda"
    channels_last = cfg.channels_last and use_cuda
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    method.to(device)

    stages = method.stages()
    starts = np.cumsum([0] + [s.epochs for s in stages]).tolist()
    total_epochs = starts[-1]
    stage_of = lambda epoch: max(i for i in range(len(stages)) if starts[i] <= epoch)  # noqa: E731
    def build_optimizer(stage: Stage):
        """A fresh optimizer over what trains in this stage (a stage may freeze or replace parts)."""
        params = [p for p in model.parameters() if p.requires_grad] + trainable_aux()
        opt = torch.optim.SGD(params, lr=stage.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(stage, e))

    def trainable_aux() -> list:
        return [p for p in method.aux.parameters() if p.requires_grad] if method.aux is not None else []

    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_epoch, current, best_acc, best_epoch, state = 0, 0, -1.0, -1, None
    if cfg.resume:
        if not last_path.is_file():
            raise UserError(f"--resume: no checkpoint at {last_path}")
        state = load_checkpoint(last_path)
        if "training" not in state:
            raise UserError(f"--resume: {last_path} holds no training state")
        changed = sorted(k for k, v in state["config"].items()
                         if k not in ("epochs", "resume") and asdict(cfg).get(k) != v)
        if changed and env.main:
            print(f"resume: settings differ from the checkpoint's: {', '.join(changed)}")
        t = state["training"]
        start_epoch, current = state["epoch"], t.get("stage", 0)
        for stage in stages[1:current + 1]:
            method.enter_stage(stage, model)  # the same modules and frozen parts as when it was saved
        model.to(device)
        model.load_state_dict(t.get("model_state", state["state_dict"]))
        scaler.load_state_dict(t["scaler"])
        if method.aux is not None:
            method.aux.load_state_dict(t["aux"])
        _set_rng_state(t["rng"][env.rank] if env.rank < len(t["rng"]) else t["rng"][0])
        best_acc, best_epoch = t["best_acc"], t["best_epoch"]

    optimizer, scheduler = build_optimizer(stages[current])
    if state is not None:
        optimizer.load_state_dict(state["training"]["optimizer"])
        scheduler.load_state_dict(state["training"]["scheduler"])
    wrap = lambda m: DistributedDataParallel(m) if env.world > 1 else m  # noqa: E731
    train_model = wrap(model)
    generator = torch.Generator()

    def build_loader(stage: Stage):
        """The training loader of a stage: its own sampler (e.g. class-aware), batch size and views."""
        data.train.transform = augment if method.views == 1 else Views(augment, method.views)
        batch = stage.batch_size or cfg.batch_size
        sampler = method.sampler(stage, data.train.targets, generator, env.rank, env.world)
        if sampler is None:
            sampler = DistributedSampler(data.train, env.world, env.rank, shuffle=True, seed=cfg.seed) \
                if env.world > 1 else RandomSampler(data.train, generator=generator)
        return sampler, DataLoader(data.train, batch, sampler=sampler, num_workers=cfg.workers, pin_memory=use_cuda,
                                   drop_last=cfg.drop_last and len(data.train) > batch * env.world, generator=generator,
                                   persistent_workers=cfg.workers > 0)

    sampler, loader = build_loader(stages[current])
    test_view = Subset(data.test, range(env.rank, len(data.test), env.world)) if env.world > 1 else data.test
    test_loader = DataLoader(test_view, max(cfg.batch_size, 256), num_workers=cfg.workers, pin_memory=use_cuda)

    if env.main:
        groups = shot_groups(data.train_counts, cfg.shot_rule)
        print(f"train {cfg.method} on {cfg.dataset}: {len(data.train)} images, {len(data.classes)} classes "
              f"(counts {max(data.train_counts)}..{min(data.train_counts)}; many/medium/few "
              f"{len(groups['many'])}/{len(groups['medium'])}/{len(groups['few'])}), test {len(data.test)}")
        if len(stages) > 1:
            print("stages: " + ", ".join(f"{s.name} {s.epochs} epochs (lr {s.lr}, {s.schedule})" for s in stages))
        print(f"model {spec.describe()}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
        print(f"device {device} x{env.world}, amp {dtype or 'off'}, epochs {start_epoch + 1}..{total_epochs}, "
              f"batch {cfg.batch_size}, lr {cfg.lr} ({cfg.schedule}), writing {last_path}")
        out.mkdir(parents=True, exist_ok=True)
    log = CsvLog(out / "log.csv", start_epoch) if env.main else None
    tb = None
    if cfg.tensorboard and env.main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"))

    metrics = None
    for epoch in range(start_epoch, total_epochs):
        if stage_of(epoch) != current:
            current = stage_of(epoch)
            method.enter_stage(stages[current], model)
            model.to(device)
            optimizer, scheduler = build_optimizer(stages[current])
            sampler, loader = build_loader(stages[current])
            train_model = wrap(model)
            if env.main:
                print(f"stage {stages[current].name}: {stages[current].epochs} epochs, "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable parameters")
        generator.manual_seed(cfg.seed + epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        method.train_mode(train_model)
        lr = optimizer.param_groups[0]["lr"]
        sums, seen, started = EpochSums(epoch), 0, time.perf_counter()
        shown = started
        stage_note = f" {stages[current].name}" if len(stages) > 1 else ""
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs}{stage_note}", disable=not env.main, leave=True,
                   dynamic_ncols=True, mininterval=1.0)
        for step, (images, targets) in enumerate(bar, start=1):
            targets = targets.to(device, non_blocking=True)
            images = [v.to(device, non_blocking=True) for v in images] if isinstance(images, list) \
                else images.to(device, non_blocking=True)
            if channels_last:
                images = [v.contiguous(memory_format=torch.channels_last) for v in images] \
                    if isinstance(images, list) else images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, logits, parts = method.loss(train_model, images, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if env.world > 1:
                for p in trainable_aux():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= env.world
            scaler.step(optimizer)
            scaler.update()
            method.after_step(train_model)
            n = len(targets)
            seen += n
            accuracy = (logits.detach().float().mean(1).argmax(1) == targets).float().mean()
            sums.add({"loss": loss, **parts, "acc": accuracy}, n)
            if step % sums.CHECK_EVERY == 0:
                sums.check_finite(env)
            now = time.perf_counter()
            if env.main and now - shown >= 1.0:  # reading the sums waits for the device: once a second
                shown = now
                bar.set_postfix(loss=f"{sums.read()['loss'] / seen:.3f}", lr=f"{lr:.4g}",
                                img_s=f"{seen * env.world / (now - started):.0f}")
        scheduler.step()
        sums.check_finite(env)
        totals = sums.read()
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v / max(seen, 1) for k, v in totals.items()},
               "images_per_s": seen * env.world / seconds, "seconds": seconds}
        row["train_acc"] *= 100

        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == total_epochs:
            correct, total = evaluate(model, test_loader, spec.num_classes, device, env, channels_last)
            metrics = summarize(correct, total, data.train_counts, cfg.shot_rule)
            row.update({f"test_{k}": v for k, v in metrics["ensemble"].items()})
            row.update({f"test_expert{k}": e["overall"] for k, e in enumerate(metrics["experts"])})
            if env.main:
                print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['images_per_s']:.0f} img/s, "
                      f"test {format_metrics(metrics)}")

        rng = [_rng_state()]
        if env.world > 1:
            rng = [None] * env.world
            dist.all_gather_object(rng, _rng_state())
        if not env.main:
            continue
        log.append(row)
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch + 1)
        payload = {"spec": spec.to_dict(), "classes": list(data.classes), "train_counts": list(data.train_counts),
                   "state_dict": method.export_state(model), "method": cfg.method, "config": asdict(cfg),
                   "metrics": metrics or {}, "epoch": epoch + 1}
        is_best = metrics is not None and method.selection_metric(metrics) > best_acc
        if is_best:
            best_acc, best_epoch = method.selection_metric(metrics), epoch + 1
            save_checkpoint(payload, best_path)
        payload["training"] = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "stage": current,
                               "model_state": model.state_dict(),
                               "scaler": scaler.state_dict(), "rng": rng, "best_acc": best_acc,
                               "best_epoch": best_epoch,
                               "aux": method.aux.state_dict() if method.aux is not None else {}}
        save_checkpoint(payload, last_path)
    if tb is not None:
        tb.close()
    if env.main and metrics is not None:
        print(f"done: {last_path} (last), {best_path} (best: epoch {best_epoch}, {best_acc:.2f}%)")
    return last_path
