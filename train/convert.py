"""python -m train.convert: import an official checkpoint into the expertfuse checkpoint format.

  python -m train.convert --from ncl|shike|ssd --src best_ensemble_model.pth --out runs/ncl-official/ncl.pt \
      [--arch resnet32] [--head linear|cosine --head-scale 16] [--dataset cifar100-lt --imb-factor 100]

NCL: strip `module.`; backbone.{k}.* -> experts.{k}.backbone.*; classifier.{k}.* (or classifier_ce.{k}.*
when the MoCo branch was on) -> experts.{k}.head.*; MoCo queues, EMA encoders and projections dropped.
SHIKE: no prefix; conv1/bn1/layer1/layer2 -> trunk.*; layer3s.{e} -> experts.{e}.backbone.layer3;
shallow_exps.{e} -> experts.{e}.fusion; rt_classifiers.{e} (cRT) or classifiers.{e}, transposed.
SSD: module. stripped; encoder_q (or encoder) -> trunk; classifier -> the hard head, classifier_kd -> the soft
head; LWS scales folded into the hard head; teacher and MoCo parts dropped.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from expertfuse.cli import run_cli
from train.checkpoint import CheckpointPayload, model_from_payload, read_torch_file, save_checkpoint
from train.data.datasets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD
from train.data.longtail import longtail_counts
from expertfuse.errors import UserError
from train.models.backbones import stage_names
from train.models.spec import CIFAR_ARCHS, ModelSpec


def _load_official(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"source checkpoint not found: {path}")
    data = read_torch_file(path, kind="checkpoint", writer="the official code (torch.save)")
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_arch(trunk: dict[str, torch.Tensor]) -> str:
    """Architecture from one expert's trunk keys (no prefix)."""
    if "layer4.0.conv1.weight" not in trunk:
        blocks = len({k.split(".")[1] for k in trunk if k.startswith("layer1.")})
        return f"resnet{6 * blocks + 2}"
    if len({k.split(".")[1] for k in trunk if k.startswith("layer3.")}) > 6:
        return "resnet152"
    conv2 = trunk["layer1.0.conv2.weight"]
    return "resnext50_32x4d" if conv2.shape[1] != conv2.shape[0] else "resnet50"


def convert_ncl(state: dict[str, torch.Tensor], args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """(our state_dict, spec fields) from an official NCL state dict (module. already stripped)."""
    moco = any(k.startswith("classifier_ce.") for k in state)
    head_prefix = "classifier_ce" if moco else "classifier"
    ours, trunk = {}, {}
    for key, value in state.items():
        if m := re.fullmatch(r"backbone\.(\d+)\.(.+)", key):
            ours[f"experts.{m[1]}.backbone.{m[2]}"] = value
            if m[1] == "0":
                trunk[m[2]] = value
        elif m := re.fullmatch(rf"{head_prefix}\.(\d+)\.(weight|bias)", key):
            ours[f"experts.{m[1]}.head.{m[2]}"] = value
        elif not re.match(r"(MOCO|backbone_MA|module_MA|classifier_MA|classifier|module)\.", key):
            raise UserError(f"unexpected key in an NCL checkpoint: {key}")
    experts = len({k.split(".")[1] for k in ours})
    if not experts:
        raise UserError("no backbone.{k}.* keys: this is not an NCL checkpoint")
    arch = args.arch or infer_arch(trunk)
    head = args.head or ("linear" if arch in CIFAR_ARCHS else "cosine")
    return ours, {"arch": arch, "num_experts": experts, "shortcut": "A", "head": head, "head_scale": args.head_scale,
                  "head_bias": "experts.0.head.bias" in ours}


def convert_shike(state: dict[str, torch.Tensor], args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """SHIKE (CIFAR ResNet-32 MoE): shared conv1/bn1/layer1/layer2, layer3s.{e}, shallow_exps.{e} aligners,
    NormedLinear heads stored [in, out] (transposed here); the cRT heads (rt_classifiers) when present."""
    heads = "rt_classifiers" if any(k.startswith("rt_classifiers.") for k in state) and not args.stage1_heads \
        else "classifiers"
    ours = {}
    for key, value in state.items():
        if re.match(r"(conv1|bn1|layer1|layer2)\.", key):
            ours[f"trunk.{key}"] = value
        elif m := re.fullmatch(r"layer3s\.(\d+)\.(.+)", key):
            ours[f"experts.{m[1]}.backbone.layer3.{m[2]}"] = value
        elif m := re.fullmatch(r"shallow_exps\.(\d+)\.convs\.StridedConv(\d+)\.conv\.(\d)\.(.+)", key):
            ours[f"experts.{m[1]}.fusion.units.{m[2]}.{m[3]}.{m[4]}"] = value
        elif m := re.fullmatch(rf"{heads}\.(\d+)\.weight", key):
            ours[f"experts.{m[1]}.head.weight"] = value.t().contiguous()
        elif not re.fullmatch(r"(rt_)?classifiers\.\d+\.weight", key):
            raise UserError(f"unexpected key in a SHIKE checkpoint: {key}")
    experts = len({k.split(".")[1] for k in ours if k.startswith("experts.")})
    if not experts or "trunk.conv1.weight" not in ours:
        raise UserError("no layer3s.{e}.* / conv1 keys: this is not a SHIKE checkpoint")
    blocks = len({k.split(".")[2] for k in ours if k.startswith("trunk.layer1.")})
    return ours, {"arch": args.arch or f"resnet{6 * blocks + 2}", "num_experts": experts, "shortcut": "B",
                  "shared_stages": 3, "fusion": "dkf", "head": "normed", "head_scale": 30.0, "head_bias": False}


def convert_ssd(state: dict[str, torch.Tensor], args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """SSD-LT (module. already stripped). Stage III: encoder_q + classifier (hard) + classifier_kd (soft); the
    teacher (encoder_t, classifier_t) is dropped. Stage II / IV: encoder + classifier.fc with the LWS scales
    folded in (hard head only). Stage I: encoder_q + classifier; MoCo keys dropped."""
    encoder = "encoder_q" if any(k.startswith("encoder_q.") for k in state) else "encoder"
    ours, trunk, heads = {}, {}, {}
    for key, value in state.items():
        if key.startswith(encoder + "."):
            rest = key[len(encoder) + 1:]
            if not rest.startswith("fc."):
                ours[f"trunk.{rest}"] = trunk[rest] = value
        elif m := re.fullmatch(r"(classifier|classifier_kd|classifier\.fc)\.(weight|bias)", key):
            heads.setdefault(m[1].removesuffix(".fc"), {})[m[2]] = value
        elif key == "classifier.scales":
            heads.setdefault("scales", {})["scales"] = value
        elif not re.match(r"(encoder_k|encoder_t|classifier_t|q_fc|k_fc)\.|queue|label_queue|queue_ptr", key):
            raise UserError(f"unexpected key in an SSD checkpoint: {key}")
    if not trunk or "classifier" not in heads:
        raise UserError("no encoder / classifier keys: this is not an SSD checkpoint")
    hard = heads["classifier"]
    if "scales" in heads:  # LWS: W' = diag(s) W, b' = s * b
        s = heads["scales"]["scales"]
        hard = {"weight": hard["weight"] * s[:, None], "bias": hard["bias"] * s}
    named = {"hard": hard, **({"soft": heads["classifier_kd"]} if "classifier_kd" in heads else {})}
    for i, head in enumerate(named.values()):
        ours[f"experts.{i}.head.weight"], ours[f"experts.{i}.head.bias"] = head["weight"], head["bias"]
    arch = args.arch or infer_arch(trunk)
    return ours, {"arch": arch, "num_experts": len(named), "expert_names": list(named), "head": "linear",
                  "shared_stages": len(stage_names(arch))}


CONVERTERS = {"ncl": convert_ncl, "shike": convert_shike, "ssd": convert_ssd}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=sorted(CONVERTERS), help="official code base")
    p.add_argument("--src", required=True, type=Path, help="official checkpoint (.pth / .pth.tar)")
    p.add_argument("--out", required=True, type=Path, help="expertfuse checkpoint to write")
    p.add_argument("--arch", help="architecture (default: inferred from the weights)")
    p.add_argument("--head", choices=["linear", "cosine"], help="head type (default: linear for CIFAR, cosine otherwise)")
    p.add_argument("--head-scale", type=float, default=16.0, help="cosine scale s (NCL: 16; iNat: 32)")
    p.add_argument("--dataset", default="", help="cifar10-lt | cifar100-lt | imagenet-lt | places-lt | inat2018: "
                                                 "normalization and (CIFAR) training counts")
    p.add_argument("--imb-factor", type=float, default=100.0, help="CIFAR imbalance factor for the training counts")
    p.add_argument("--classes", type=Path, help="text file with one class name per line")
    p.add_argument("--stage1-heads", action="store_true", help="shike: serve the stage-1 heads, not the cRT heads")
    return p


def convert(args: argparse.Namespace) -> Path:
    state, fields = CONVERTERS[args.source](_load_official(args.src), args)
    cifar = fields["arch"] in CIFAR_ARCHS
    num_classes = state["experts.0.head.weight"].shape[0]
    mean, std = (CIFAR_MEAN, CIFAR_STD) if cifar else (INAT_MEAN, INAT_STD) if args.dataset == "inat2018" \
        else (IMAGENET_MEAN, IMAGENET_STD)
    spec = ModelSpec(**fields, num_classes=num_classes, input_size=32 if cifar else 224, resize=32 if cifar else 256,
                     mean=list(mean), std=list(std))
    classes = [f"class_{c}" for c in range(num_classes)]
    if args.classes:
        classes = [line.strip() for line in args.classes.read_text().splitlines() if line.strip()]
        if len(classes) != num_classes:
            raise UserError(f"{args.classes} lists {len(classes)} classes, the checkpoint has {num_classes}")
    counts = []
    if args.dataset.startswith("cifar"):
        counts = longtail_counts(5000 if num_classes == 10 else 500, num_classes, args.imb_factor)
    payload = CheckpointPayload(spec=spec, classes=classes, train_counts=counts, state_dict=state, method=args.source,
                                config={"converted_from": str(args.src), "source": args.source})
    model_from_payload(payload, f"converted weights of {args.src}")
    save_checkpoint(payload, args.out)
    print(f"wrote {args.out}: {spec.describe()}, {len(state)} tensors kept")
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(lambda: convert(build_parser().parse_args())))
