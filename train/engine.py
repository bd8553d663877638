"""The training run: data, model, method and stages put together, then epochs of train / evaluate / save.

The parts live in train/training/: the step and the epoch loop (loop.py), evaluation (evaluation.py), seeding,
resume and the checkpoint payload (state.py), torchrun helpers (distributed.py), log.csv / TensorBoard (logs.py),
one run per output folder (lock.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from expertfuse.errors import UserError
from train.checkpoint import save_checkpoint
from train.config import TrainConfig, load_preset, resolve_config
from train.data.datasets import DATASET_GEOMETRY, DataBundle, Geometry, build_data
from train.data.options import DataOptions
from train.data.longtail import shot_groups
from train.data.transforms import eval_transform, training_transform
from train.methods import get_method
from train.methods.base import Method
from train.models import ModelSpec, MultiExpertNet, build_model
from train.models.backbones import load_torchvision_weights
from train.schedule import Stage
from train.training.distributed import Distributed
from train.training.evaluation import evaluate, format_metrics, metrics_row, summarize
from train.training.logs import EpochLogs
from train.training.lock import output_folder_lock
from train.training.loop import TrainStep, build_loader, build_optimizer, train_one_epoch
from train.training.state import (Progress, epoch_payload, read_resume_state, restore, rng_state, seed_everything,
                                  training_state)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype --amp asks for on this device (None: full precision). FP16 is a CUDA setting (the
    official SHIKE recipe's): CPU autocast to FP16 is many times slower than FP32, so on CPU it means full
    precision; bf16 is honoured on CPU."""
    if cfg.amp == "off" or (cfg.amp in ("auto", "fp16") and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def build_spec(cfg: TrainConfig, data: DataBundle | Geometry) -> ModelSpec:
    """The network a run trains: the config's architecture over the data's classes, input size and normalization."""
    classes = len(data.classes) if isinstance(data, DataBundle) else data.num_classes
    size = cfg.input_size or data.input_size
    fields = dict(arch=cfg.arch, num_classes=classes, num_experts=cfg.num_experts,
                  shared_stages=cfg.shared_stages, shortcut=cfg.shortcut, fusion=cfg.fusion, head=cfg.head,
                  head_scale=cfg.head_scale, input_size=size, resize=cfg.resize or max(data.resize, size),
                  mean=list(data.mean), std=list(data.std))
    return ModelSpec(**get_method(cfg.method).adapt_spec(fields))


def preset_spec(preset: str) -> ModelSpec:
    """A preset's network at its dataset's real size (classes, input), without the data: what export and the
    real-size bench build to measure it."""
    cfg = resolve_config(load_preset(preset))
    if cfg.dataset not in DATASET_GEOMETRY:
        raise UserError(f"preset {preset} trains on {cfg.dataset}, whose size is set by its data; "
                        f"presets of {', '.join(DATASET_GEOMETRY)} have a fixed size")
    return build_spec(cfg, DATASET_GEOMETRY[cfg.dataset])


@dataclass
class Run:
    """What one training run is made of, built once: data, spec, model, method, its stages, precision."""

    cfg: TrainConfig
    env: Distributed
    data: DataBundle
    spec: ModelSpec
    model: MultiExpertNet
    method: Method
    stages: list[Stage]
    augment: str  # the augmentation preset of the training images
    dtype: torch.dtype | None
    channels_last: bool
    scaler: torch.amp.GradScaler = field(init=False)
    starts: list[int] = field(init=False)  # first epoch of each stage, then the total
    generator: torch.Generator = field(default_factory=torch.Generator)  # the loaders' shuffling, seeded per epoch

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.dtype == torch.float16)
        self.starts = np.cumsum([0] + [s.epochs for s in self.stages]).tolist()

    @property
    def total_epochs(self) -> int:
        return self.starts[-1]

    def stage_of(self, epoch: int) -> int:
        return max(i for i in range(len(self.stages)) if self.starts[i] <= epoch)


def build_run(cfg: TrainConfig, env: Distributed) -> Run:
    method_cls = get_method(cfg.method)
    data = build_data(DataOptions(**{k: getattr(cfg, k) for k in DataOptions.__dataclass_fields__}))
    spec = build_spec(cfg, data)
    augment = cfg.augment or data.augment
    data.test.transform = eval_transform(spec)
    model = build_model(spec)
    if cfg.pretrained:
        for module in ([model.trunk] if model.trunk is not None else []) + [e.backbone for e in model.experts]:
            load_torchvision_weights(module, cfg.arch)
    method = method_cls(cfg, model, data.train_counts)
    channels_last = cfg.channels_last and env.device.type == "cuda"
    model.to(env.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    method.to(env.device)
    return Run(cfg, env, data, spec, model, method, method.stages(), augment, amp_dtype(cfg, env.device),
               channels_last)


@dataclass
class Phase:
    """The current stage's optimizer, LR schedule, sampler, loader and training step."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: object
    loader: DataLoader
    step: TrainStep


def enter_phase(run: Run, progress: Progress) -> Phase:
    """Fresh optimizer and loader for progress.stage (the saved optimizer states once, after a resume)."""
    cfg, stage = run.cfg, run.stages[progress.stage]
    optimizer, scheduler = build_optimizer(cfg, run.model, run.method, stage)
    if progress.optimizer_state is not None:
        optimizer.load_state_dict(progress.optimizer_state)
        scheduler.load_state_dict(progress.scheduler_state)
        progress.optimizer_state = progress.scheduler_state = None
    step = TrainStep(run.env.wrap(run.model), run.method, optimizer, run.scaler, run.env.device, run.dtype,
                     run.channels_last, run.env.world)
    run.data.train.transform = training_transform(run.augment, cfg.key_augment, run.spec, run.method.views)
    sampler, loader = build_loader(cfg, run.data.train, run.method, stage, run.generator, run.env)
    return Phase(optimizer, scheduler, sampler, loader, step)


def next_stage(run: Run, progress: Progress) -> Phase:
    """Let the method change the model for the next stage (freeze, replace heads), then a fresh phase."""
    stage = run.stages[progress.stage]
    run.method.enter_stage(stage, run.model)
    run.model.to(run.env.device)
    phase = enter_phase(run, progress)
    if run.env.main:
        print(f"stage {stage.name}: {stage.epochs} epochs, "
              f"{sum(p.numel() for p in run.model.parameters() if p.requires_grad)} trainable parameters")
    return phase


def build_test_loader(run: Run) -> DataLoader:
    """Each rank evaluates every world-th test image; evaluate() sums the counts over ranks."""
    env, test = run.env, run.data.test
    view = Subset(test, range(env.rank, len(test), env.world)) if env.world > 1 else test
    return DataLoader(view, max(run.cfg.batch_size, 256), num_workers=run.cfg.workers,
                      pin_memory=env.device.type == "cuda")


def announce(run: Run, progress: Progress) -> None:
    cfg, data, stages = run.cfg, run.data, run.stages
    groups = shot_groups(data.train_counts, cfg.shot_rule)
    print(f"train {cfg.method} on {cfg.dataset}: {len(data.train)} images, {len(data.classes)} classes "
          f"(counts {max(data.train_counts)}..{min(data.train_counts)}; many/medium/few "
          f"{len(groups['many'])}/{len(groups['medium'])}/{len(groups['few'])}), test {len(data.test)}")
    if len(stages) > 1:
        print("stages: " + ", ".join(f"{s.name} {s.epochs} epochs (lr {s.lr}, {s.schedule})" for s in stages))
    print(f"model {run.spec.describe()}, {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M parameters")
    print(f"device {run.env.device} x{run.env.world}, amp {run.dtype or 'off'}, epochs "
          f"{progress.start_epoch + 1}..{run.total_epochs}, batch {cfg.batch_size}, lr {cfg.lr} ({cfg.schedule}), "
          f"writing {run.cfg.last_checkpoint}")


def run_epoch(run: Run, phase: Phase, epoch: int, tests: DataLoader) -> tuple[dict, dict | None]:
    """Train one epoch, then evaluate when it is due: (log row, metrics or None)."""
    cfg, env = run.cfg, run.env
    run.generator.manual_seed(cfg.seed + epoch)
    if hasattr(phase.sampler, "set_epoch"):
        phase.sampler.set_epoch(epoch)
    run.method.train_mode(phase.step.model)
    note = f" {run.stages[run.stage_of(epoch)].name}" if len(run.stages) > 1 else ""
    row = train_one_epoch(phase.step, phase.loader, epoch, f"epoch {epoch + 1}/{run.total_epochs}{note}", env)
    phase.scheduler.step()
    if (epoch + 1) % cfg.eval_every and epoch + 1 != run.total_epochs:
        return row, None
    correct, total = evaluate(run.model, tests, run.spec.num_classes, env.device, env, run.channels_last,
                              run.method.served_experts)
    metrics = summarize(correct, total, run.data.train_counts, cfg.shot_rule, run.method.served_label)
    row.update(metrics_row(metrics))
    if env.main:
        print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['images_per_s']:.0f} img/s, "
              f"test {format_metrics(metrics)}")
    return row, metrics


def save_epoch(run: Run, phase: Phase, progress: Progress, epoch: int, metrics: dict | None) -> None:
    """<method>_best.pt when the selection metric improved, and <method>.pt with the state --resume needs."""
    rng = run.env.all_gather_object(rng_state())
    if not run.env.main:
        return
    payload = epoch_payload(run.cfg, run.spec, run.data, run.method, run.model, metrics, epoch)
    if metrics is not None and run.method.selection_metric(metrics) > progress.best_acc:
        progress.best_acc, progress.best_epoch = run.method.selection_metric(metrics), epoch + 1
        save_checkpoint(payload, run.cfg.best_checkpoint)
    payload.training = training_state(progress, run.model, run.method, phase.optimizer, phase.scheduler,
                                      run.scaler, rng)
    save_checkpoint(payload, run.cfg.last_checkpoint)


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the path of the last checkpoint (<out>/<method>.pt)."""
    cfg.validate()
    with output_folder_lock(cfg):
        env = Distributed()
        try:
            return _train(cfg, env)
        finally:
            env.close()


def _train(cfg: TrainConfig, env: Distributed) -> Path:
    seed_everything(cfg.seed)
    run = build_run(cfg, env)
    progress = Progress()
    if cfg.resume:
        saved = read_resume_state(run)
        progress = restore(saved, run.model, run.method, run.stages, run.scaler, env)
    phase, tests = enter_phase(run, progress), build_test_loader(run)
    logs = None
    if env.main:
        announce(run, progress)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        logs = EpochLogs(Path(cfg.out), progress.start_epoch, cfg.tensorboard)
    metrics = None
    for epoch in range(progress.start_epoch, run.total_epochs):
        if run.stage_of(epoch) != progress.stage:
            progress.stage = run.stage_of(epoch)
            phase = next_stage(run, progress)
        row, evaluated = run_epoch(run, phase, epoch, tests)
        metrics = evaluated or metrics  # a checkpoint carries the latest evaluation
        if logs is not None:
            logs.append(row)
        save_epoch(run, phase, progress, epoch, metrics)
    if logs is not None:
        logs.close()
    if env.main and metrics is not None:
        print(f"done: {run.cfg.last_checkpoint} (last), {run.cfg.best_checkpoint} (best: epoch {progress.best_epoch}, "
              f"{progress.best_acc:.2f}%)")
    return run.cfg.last_checkpoint
