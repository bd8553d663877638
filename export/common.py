"""What export.onnx and export.trt share: flags, checkpoint loading, test inputs, parity, summary."""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expertfuse.contract import INPUT_LAYOUTS
from export.graph import GraphOptions, parse_experts, reference_logits
from serve.repository import RepositoryError, ServingOptions, TensorSpec, version_policy
from train.checkpoint import load_model
from train.data.synthetic import synthesize
from expertfuse.cli import int_list
from expertfuse.errors import ParityError, UserError
from train.models import MultiExpertNet


def version_policy_arg(text: str) -> str:
    """argparse type: a Triton version policy, checked by the repository writer's own parser."""
    try:
        version_policy(text)
    except RepositoryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_common_args(p: argparse.ArgumentParser, default_max_batch: int) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="training checkpoint (.pt)")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="model repository [model_repository]")
    p.add_argument("--name", help="model name (default from the checkpoint: ncl, ncl_expert0, ncl_trt, ...)")
    p.add_argument("--experts", default="all", help="all | 0 | 0,2 [all]")
    p.add_argument("--head", help="serve one named head of the checkpoint (SSD: soft | hard; default soft)")
    p.add_argument("--fusion", default="auto", choices=["loop", "grouped", "auto"],
                   help="how experts run in the graph; auto measures both on the target [auto]")
    p.add_argument("--input", dest="input_layout", default="uint8-nhwc", choices=INPUT_LAYOUTS,
                   help="graph input: UINT8 [B,H,W,3] or FP32 [B,3,H,W], pixels 0..255 [uint8-nhwc]")
    p.add_argument("--max-batch", type=int, default=default_max_batch, help=f"Triton max_batch_size [{default_max_batch}]")
    p.add_argument("--probs", action="store_true", help="also output softmax probabilities")
    p.add_argument("--expert-logits", action="store_true", help="also output every expert's logits [B,K,C]")
    p.add_argument("--fp16", action="store_true", help="FP16 graph with FP32 inputs/outputs")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder instead of adding a version")
    p.add_argument("--atol", type=float, default=1e-4, help="FP32 parity tolerance on logits [1e-4]")
    p.add_argument("--instance-kind", choices=["cpu", "gpu"], help="Triton instance kind (default: gpu if CUDA)")
    p.add_argument("--instance-count", type=int, default=1, help="Triton model instances [1]")
    p.add_argument("--gpus", type=int_list, default=[], help="GPU ids of the instances, e.g. 0,1 (default: all)")
    p.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batching queue delay [100]")
    p.add_argument("--preferred-batch-sizes", type=int_list, default=[],
                   help="dynamic batching's preferred batch sizes, e.g. 16,32 (default: none)")
    p.add_argument("--version-policy", type=version_policy_arg, default="latest:1",
                   help="which versions Triton serves: latest:N | all | specific:1,3 [latest:1]")


@dataclass
class ExportJob:
    model: MultiExpertNet
    checkpoint: dict
    checkpoint_sha256: str
    opts: GraphOptions
    name: str
    args: argparse.Namespace

    @property
    def spec(self):
        return self.model.spec


def prepare(args: argparse.Namespace, suffix: str = "") -> ExportJob:
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if any(not 1 <= b <= args.max_batch for b in args.preferred_batch_sizes):
        raise UserError(f"--preferred-batch-sizes {args.preferred_batch_sizes} must lie in 1..--max-batch {args.max_batch}")
    model, data = load_model(args.ckpt)
    experts = parse_experts(args.experts, model.num_experts)
    names = model.spec.expert_names
    head = getattr(args, "head", None) or ("soft" if "soft" in names and args.experts == "all" else None)
    if head:
        if head not in names:
            raise UserError(f"--head {head}: the checkpoint's heads are {', '.join(names) or 'unnamed (use --experts)'}")
        experts = (names.index(head),)
    name = args.name or default_name(data["method"], experts, model.num_experts, args.fp16, suffix, names)
    digest = hashlib.sha256(args.ckpt.read_bytes()).hexdigest()
    opts = GraphOptions(experts, args.fusion, args.input_layout, args.probs, args.expert_logits, args.fp16)
    return ExportJob(model, data, digest, opts, name, args)


def job_for(ckpt: Path, experts: str = "all", fusion: str = "loop", *, probs: bool = False,
            expert_logits: bool = False, max_batch: int = 256) -> ExportJob:
    """An FP32 uint8-NHWC export job without a command line (bench and tests)."""
    return prepare(argparse.Namespace(ckpt=Path(ckpt), experts=experts, fusion=fusion, input_layout="uint8-nhwc",
                                      probs=probs, expert_logits=expert_logits, fp16=False, max_batch=max_batch,
                                      name=None, atol=1e-4, head=None, preferred_batch_sizes=[]))


def default_name(method: str, experts: tuple[int, ...], total: int, fp16: bool, suffix: str,
                 names: list[str] | None = None) -> str:
    part = "" if len(experts) == total and experts == tuple(range(total)) else \
        f"_{names[experts[0]]}" if len(experts) == 1 and names else \
        f"_expert{experts[0]}" if len(experts) == 1 else "_experts" + "_".join(map(str, experts))
    return f"{method}{part}{'_fp16' if fp16 else ''}{suffix}"


def signature(job: ExportJob) -> tuple[list[TensorSpec], list[TensorSpec]]:
    s = job.spec
    image = TensorSpec("image", "UINT8", [s.input_size, s.input_size, 3], "NHWC") if job.opts.input_layout == "uint8-nhwc" \
        else TensorSpec("image", "FP32", [3, s.input_size, s.input_size], "NCHW")
    outputs = [TensorSpec("logits", "FP32", [s.num_classes], labels=True)]
    if job.opts.probs:
        outputs.append(TensorSpec("probs", "FP32", [s.num_classes], labels=True))
    if job.opts.expert_logits:
        outputs.append(TensorSpec("expert_logits", "FP32", [len(job.opts.experts), s.num_classes]))
    return [image], outputs


def serving_options(args: argparse.Namespace, max_batch: int) -> ServingOptions:
    """The Triton settings of the shared flags; export.onnx adds its ONNX Runtime options."""
    kind = args.instance_kind or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.gpus and kind != "gpu":
        raise UserError("--gpus applies to GPU instances only; add --instance-kind gpu")
    return ServingOptions(max_batch_size=max_batch, max_queue_delay_us=args.max_queue_delay_us,
                          preferred_batch_sizes=args.preferred_batch_sizes, instance_kind=kind,
                          instance_count=args.instance_count, gpus=args.gpus, warmup_batch_sizes=[1, max_batch],
                          versions=args.version_policy)


def metadata(job: ExportJob, fusion: str) -> dict[str, str]:
    """Key/value facts stored in the artifact (ONNX metadata_props) and in config.pbtxt parameters."""
    import json
    s = job.spec
    return {"expertfuse.classes": json.dumps(job.checkpoint["classes"]), "expertfuse.mean": json.dumps(s.mean),
            "expertfuse.std": json.dumps(s.std), "expertfuse.input_size": str(s.input_size),
            "expertfuse.resize": str(s.resize), "expertfuse.input_layout": job.opts.input_layout,
            "expertfuse.experts": ",".join(map(str, job.opts.experts)), "expertfuse.fusion": fusion,
            "expertfuse.precision": "fp16" if job.opts.fp16 else "fp32", "expertfuse.arch": s.arch,
            "expertfuse.method": job.checkpoint["method"], "expertfuse.checkpoint_sha256": job.checkpoint_sha256}


def test_images(job: ExportJob, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and real-looking images (the synthetic gratings) in the graph's input layout."""
    size = job.spec.input_size
    rng = np.random.RandomState(seed)
    images = {"random": rng.randint(0, 256, (count, size, size, 3), dtype=np.uint8),
              "real-looking": synthesize([count], seed=seed, image_size=size)[0]}
    out = {}
    for kind, pixels in images.items():
        t = torch.from_numpy(pixels)
        out[kind] = t if job.opts.input_layout == "uint8-nhwc" else t.permute(0, 3, 1, 2).float().contiguous()
    return out


def check_parity(job: ExportJob, run: Callable[[np.ndarray], np.ndarray], batches: list[int]) -> list[dict]:
    """Run the exported model at each batch size on random and real-looking inputs against the PyTorch
    reference (FP32 mean of the chosen experts). FP32: max|diff| <= atol and identical top-1. FP16:
    top-1 agreement >= 99.5% over a larger test batch. Raises ParityError on failure."""
    rows, fp16 = [], job.opts.fp16
    for kind, images in test_images(job, max(batches) if not fp16 else max(max(batches), 400)).items():
        for batch in sorted(set(batches)):
            x = images[:batch]
            ref = reference_logits(job.model, job.opts.experts, x, job.opts.input_layout).numpy()
            got = run(x.numpy())
            rows.append({"inputs": kind, "batch": batch, "max_abs_diff": float(np.abs(got - ref).max()),
                         "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())})
        if fp16:
            ref = torch.cat([reference_logits(job.model, job.opts.experts, images[i:i + max(batches)], job.opts.input_layout)
                             for i in range(0, len(images), max(batches))]).numpy()
            got = np.concatenate([run(images[i:i + max(batches)].numpy()) for i in range(0, len(images), max(batches))])
            rows.append({"inputs": kind, "batch": len(images), "max_abs_diff": float(np.abs(got - ref).max()),
                         "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())})
    for row in rows:
        print(f"  parity {row['inputs']:>12} batch {row['batch']:>4}: max|diff| {row['max_abs_diff']:.2e}, "
              f"top-1 agreement {100 * row['top1_agreement']:.1f}%")
    if fp16:
        worst = min(r["top1_agreement"] for r in rows if r["batch"] > max(batches))
        if worst < 0.995:
            raise ParityError(f"FP16 top-1 agreement {100 * worst:.1f}% < 99.5% against PyTorch FP32; nothing written")
    else:
        bad = [r for r in rows if r["max_abs_diff"] > job.args.atol or r["top1_agreement"] < 1.0]
        if bad:
            r = bad[0]
            raise ParityError(f"parity failed ({r['inputs']} inputs, batch {r['batch']}: max|diff| {r['max_abs_diff']:.2e} "
                              f"> {job.args.atol:g} or top-1 {100 * r['top1_agreement']:.1f}%); nothing written")
    return rows


def print_summary(model_dir: Path, version: int, inputs: list[TensorSpec], outputs: list[TensorSpec], fusion: str) -> None:
    files = sorted(p for p in (model_dir / str(version)).rglob("*") if p.is_file())
    print(f"wrote {model_dir}/ version {version} (fusion {fusion}):")
    for f in files + [model_dir / "config.pbtxt", model_dir / "labels.txt"]:
        print(f"  {f}  {f.stat().st_size / 1e6:.2f} MB")
    for t in inputs:
        print(f"  input  {t.name} {t.dtype} [-1, {', '.join(map(str, t.dims))}] ({t.format})")
    for t in outputs:
        print(f"  output {t.name} {t.dtype} [-1, {', '.join(map(str, t.dims))}]{' with labels' if t.labels else ''}")
