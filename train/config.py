"""The training configuration, in layers: field defaults < the dataset's defaults < the method's required
settings < YAML preset < command line. Every field is a flag, and anything chosen (preset or flag) wins.

Presets (train/presets/*.yaml) reproduce the official recipes; `--preset ncl-cifar100-lt`.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from expertfuse.errors import UserError

# The methods train.methods registers (a test holds the two equal): known here so that a misspelled --method is
# refused before torch is imported.
METHOD_NAMES = ("ce", "ncl", "shike", "ecl", "ssd")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw}) if not isinstance(default, list) \
        else field(default_factory=lambda: list(default), metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # What and where
    method: str = _opt("ncl", f"training method ({', '.join(METHOD_NAMES)})")
    dataset: str = _opt("synthetic", "synthetic | cifar10-lt | cifar100-lt | imagenet-lt | places-lt | inat2018 | imagefolder")
    data_root: str = _opt("data", "dataset folder (CIFAR pickles, image lists + images, or an ImageFolder tree)")
    download: bool = _opt(False, "download CIFAR through torchvision if missing")
    out: str = _opt("runs/ncl", "output folder: <method>.pt (last), <method>_best.pt, log.csv")
    resume: bool = _opt(False, "continue from <out>/<method>.pt exactly where it stopped")
    # Data
    imb_factor: float = _opt(100.0, "imbalance factor n_max/n_min (CIFAR, synthetic, ImageFolder)")
    lt_profile: str = _opt("exp", "long-tail profile: exp | step")
    subset_mode: str = _opt("shuffle", "which images a class keeps: shuffle (LDAM/RIDE, seed 0) | first (SHIKE)")
    eval_split: str = _opt("test", "image lists / ImageFolder: evaluate on val or test")
    train_list: str = _opt("", "image-list file for training (default: the dataset's OLTR name)")
    eval_list: str = _opt("", "image-list file for evaluation")
    synthetic_classes: int = _opt(10, "synthetic data: number of classes")
    synthetic_max: int = _opt(300, "synthetic data: images in the head class")
    synthetic_test: int = _opt(100, "synthetic data: test images per class")
    synthetic_seed: int = _opt(0, "synthetic data: generator seed (independent of --seed)")
    augment: str = _opt("", "augmentation preset: cifar | cifar-basic | imagenet | imagenet-basic | mocov2 | ncl-sim | "
                            "none (default: per dataset)")
    key_augment: str = _opt("", "contrastive key view's augmentation preset (default: a second draw of --augment)")
    input_size: int = _opt(0, "network input size (default: per dataset)")
    resize: int = _opt(0, "test-time shorter-side resize (default: per dataset)")
    shot_rule: str = _opt("strict", "shot groups: strict (many>100, few<20) | ncl (>=100, <=20)")
    workers: int = _opt(0, "data-loader worker processes")
    # Model
    arch: str = _opt("resnet32", "resnet32 | resnet20 | resnet8 | resnet50 | resnext50_32x4d | resnet152")
    num_experts: int = _opt(3, "experts")
    shared_stages: int = _opt(0, "stages shared by all experts (0: separate trunks)")
    shortcut: str = _opt("A", "CIFAR ResNet shortcut: A (NCL) | B (SHIKE)")
    fusion: str = _opt("", "shallow-feature fusion into the experts: '' | dkf (SHIKE; needs --shared-stages >= 2)")
    head: str = _opt("linear", "linear | cosine | normed | lws")
    head_scale: float = _opt(16.0, "scale of cosine/normed heads")
    pretrained: bool = _opt(False, "start torchvision trunks from ImageNet weights (downloaded)")
    # Optimization
    epochs: int = _opt(400, "epochs")
    batch_size: int = _opt(64, "batch size per process")
    lr: float = _opt(0.1, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum")
    weight_decay: float = _opt(2e-4, "weight decay (all parameters, as the official code)")
    schedule: str = _opt("multistep", "multistep (with warmup) | cosine (NCL, 1-indexed) | warmup-cosine (SHIKE; SSD/MoCo with --warmup-epochs 0)")
    warmup_epochs: int = _opt(5, "linear warmup epochs")
    warmup_start: float = _opt(1.0 / 3, "LR factor the warmup starts from (NCL 1/3; SHIKE 1/6)")
    milestones: list[int] = _opt([320, 360], "multistep: epochs where the lr is multiplied by 0.1")
    eta_min: float = _opt(1e-4, "cosine: final learning rate")
    drop_last: bool = _opt(True, "drop the last incomplete training batch (SHIKE's official loaders keep it)")
    seed: int = _opt(42, "random seed")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on CUDA if supported, else fp16) | bf16 | fp16 (CUDA only) | off")
    channels_last: bool = _opt(True, "channels_last memory format on CUDA")
    eval_every: int = _opt(1, "evaluate every N epochs (and always at the end)")
    tensorboard: bool = _opt(False, "also write TensorBoard logs to <out>/tb")
    # CE baseline
    balanced_softmax: bool = _opt(False, "ce: add log class counts to the logits (balanced softmax)")
    # NCL
    hcm_n: int = _opt(30, "ncl: hard categories kept by HCM")
    ce_ratio: float = _opt(1.0, "ncl: weight of the full-logit CE")
    hcm_ratio: float = _opt(1.0, "ncl: weight of the partial-logit CE")
    diversity_factor: float = _opt(0.6, "ncl: NBOD weight on full distributions")
    diversity_factor_hcm: float = _opt(0.6, "ncl: NBOD weight on partial distributions")
    ncl_moco: bool = _opt(False, "ncl: contrastive MoCo branch")
    con_ratio: float = _opt(1.0, "ncl: weight of the contrastive loss")
    moco_t: float = _opt(0.2, "ncl: InfoNCE temperature")
    moco_dim: int = _opt(64, "ncl: projection dimension")
    moco_queue: int = _opt(1024, "ncl: queue length per expert")
    moco_momentum: float = _opt(0.999, "ncl: EMA momentum of the key encoder")
    moco_independent_key_init: bool = _opt(True, "ncl quirk: key encoder from its own random init")
    moco_frozen_key_projection: bool = _opt(True, "ncl quirk: key projection never updated")
    moco_ema_before_backward: bool = _opt(True, "ncl: EMA step in the loss, after the step's keys (official); "
                                                "off: after the optimizer step")
    moco_ema_once: bool = _opt(False, "ncl: one EMA step per training step (official: one per expert, momentum^K)")
    # ECL (a documented interpretation: see train/methods/ecl.py)
    ecl_reweight: bool = _opt(True, "ecl: per-class distillation weights from the label vs distillation heads")
    ecl_kd_weight: float = _opt(1.0, "ecl: weight of the re-weighted expert-to-expert distillation")
    ecl_feature_weight: float = _opt(1.0, "ecl: weight of feature-level distillation (0 turns it off)")
    ecl_contrastive: bool = _opt(False, "ecl: contrastive proxy branch (NCL's MoCo branch; moco_* settings)")
    # SSD (stage I runs for --epochs with --lr/--schedule; stage III repeats that recipe)
    ssd_slg_epochs: int = _opt(5, "ssd: stage II epochs (LWS on the frozen hard head, class-aware sampling)")
    ssd_slg_lr: float = _opt(0.2, "ssd: peak LR of the LWS stages (cosine)")
    ssd_slg_batch_size: int = _opt(0, "ssd: batch size of the LWS stages (0: --batch-size; official 512)")
    ssd_sdl_epochs: int = _opt(0, "ssd: stage III epochs (fresh network, hard CE + soft distillation; 0: as --epochs)")
    ssd_lws_epochs: int = _opt(0, "ssd: optional stage IV epochs (LWS on the hard head)")
    ssd_kd_t: float = _opt(2.0, "ssd: distillation temperature")
    ssd_queue_fill_label: int = _opt(0, "ssd: label of the not-yet-filled queue entries (official 0; -1 masks none)")
    ssd_bn_update: bool = _opt(True, "ssd: the frozen trunk's BatchNorm statistics keep updating in LWS stages (official)")
    ssd_teacher_train_bn: bool = _opt(True, "ssd: the teacher's BatchNorm runs in train mode (official quirk)")
    # SHIKE
    dkt_weight: float = _opt(10.0, "shike: weight of the hardest-negative-suppressed KL")
    crt_epochs: int = _opt(0, "shike: classifier re-training epochs after --epochs (fresh heads, frozen trunk)")
    crt_lr: float = _opt(0.1, "shike: peak LR of classifier re-training")
    crt_bn_update: bool = _opt(True, "shike: the frozen trunk's BatchNorm statistics keep updating in cRT (official)")

    def validate(self) -> "TrainConfig":
        """Refuse values training cannot run with, in one line, before any data or model is built."""
        for group, ok, rule in _RULES:
            for name in group:
                value = getattr(self, name)
                if not _holds(ok, value):
                    flag = "--" + name.replace("_", "-")
                    raise UserError(f"{flag} must be {rule}, not {value!r}; pass e.g. {flag} {_example(name)}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"--{name} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                                f"not {getattr(self, name)!r}")
        return self

    def resume_checkpoint(self) -> Path:
        """The checkpoint --resume continues from; one line if there is none (asked once the --out folder is
        locked: a run still writing its first checkpoint there is named instead)."""
        if not self.last_checkpoint.is_file():
            raise UserError(f"--resume: no checkpoint at {self.last_checkpoint}")
        return self.last_checkpoint

    @property
    def last_checkpoint(self) -> Path:
        return Path(self.out) / f"{self.method}.pt"

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.out) / f"{self.method}_best.pt"


# What a run needs of each value (validate() checks these before anything is built).
_RULES = [
    (("epochs", "batch_size", "num_experts", "eval_every", "synthetic_max", "synthetic_test", "hcm_n", "moco_dim",
      "moco_queue"), lambda v: v >= 1, "at least 1"),
    (("synthetic_classes",), lambda v: v >= 2, "at least 2"),
    (("imb_factor",), lambda v: v >= 1, "at least 1 (n_max / n_min)"),
    (("lr", "crt_lr", "ssd_slg_lr", "head_scale", "moco_t", "ssd_kd_t"), lambda v: v > 0, "a positive number"),
    (("workers", "shared_stages", "warmup_epochs", "crt_epochs", "ssd_slg_epochs", "ssd_sdl_epochs", "ssd_lws_epochs",
      "ssd_slg_batch_size", "momentum", "weight_decay", "eta_min", "input_size", "resize"),
     lambda v: v >= 0, "0 or more"),
]
_CHOICES = {"method": METHOD_NAMES, "amp": ("auto", "bf16", "fp16", "off"),
            "schedule": ("multistep", "cosine", "warmup-cosine"), "shortcut": ("A", "B")}


def _holds(rule, value) -> bool:
    """A rule on a value of the wrong type (a YAML string where a number belongs) does not hold."""
    try:
        return isinstance(value, (int, float)) and bool(rule(value))
    except TypeError:
        return False


def _example(name: str) -> str:
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    return str(default if default else 1)


# A dataset's sensible defaults when neither a preset nor a flag chose otherwise. Synthetic data: the demo
# preset's lr 0.02 (train/presets/ncl-synthetic.yaml; the generic lr 0.1 multistep diverges on it) with the
# 0-indexed cosine, so even a 1-epoch run trains at the peak rather than at the 1-indexed cosine's eta_min.
DATASET_DEFAULTS = {
    "synthetic": {"epochs": 6, "lr": 0.02, "schedule": "warmup-cosine", "warmup_epochs": 0},
}
# What a method cannot train without (its official architecture), unless a preset or a flag says otherwise.
METHOD_SETTINGS = {
    "shike": {"head": "normed", "head_scale": 30.0, "shortcut": "B", "shared_stages": 3, "fusion": "dkf"},
}


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("train.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        if name not in preset_names():
            raise UserError(f"unknown preset {name!r}; choose from {', '.join(preset_names())} or give a YAML path")
        path = resources.files("train.presets") / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise UserError(f"preset {name}: unknown fields {', '.join(sorted(unknown))}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a multi-expert long-tailed classifier.")
    parser.add_argument("--preset", help=f"YAML recipe ({', '.join(preset_names())}) or a path to one")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        elif isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="*", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"{f.metadata['help']} [{default}]")
    return parser


def resolve_config(chosen: dict) -> TrainConfig:
    """The configuration from what was chosen (preset values, then flags) over the dataset's defaults and the
    method's required settings, validated."""
    method = chosen.get("method", TrainConfig.method)
    dataset = chosen.get("dataset", TrainConfig.dataset)
    values = {**DATASET_DEFAULTS.get(dataset, {}), **METHOD_SETTINGS.get(method, {}), **chosen}
    return TrainConfig(**values).validate()


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_preset(args.pop("preset")) if args.get("preset") else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return resolve_config(values)
