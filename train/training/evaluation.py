"""Evaluation: per-class correct counts of every expert and of the served prediction (the ensemble, or the head a
method serves), and their many/medium/few summary."""
from __future__ import annotations

import numpy as np
import torch

from train.data.longtail import group_accuracy
from train.training.distributed import Distributed


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, env: Distributed, channels_last: bool = False,
             served: tuple[int, ...] | None = None) -> tuple:
    """Per-class correct counts of each expert and of the served prediction (mean logits of the `served` experts,
    default all): ([K+1, C], [C])."""
    model.eval()
    correct, total = None, torch.zeros(num_classes, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        fused = (logits if served is None else logits[:, list(served)]).mean(1)
        preds = torch.cat([logits.argmax(2), fused.argmax(1, keepdim=True)], dim=1)  # [B, K+1]
        if correct is None:
            correct = torch.zeros(preds.shape[1], num_classes, dtype=torch.float64, device=device)
        hits = (preds == targets[:, None]).double()
        correct.index_add_(1, targets, hits.T)
        total += torch.bincount(targets, minlength=num_classes).double()
    return env.all_reduce(correct).cpu().numpy(), env.all_reduce(total).cpu().numpy()


def summarize(correct: np.ndarray, total: np.ndarray, train_counts: list[int], rule: str,
              served_label: str = "ensemble") -> dict:
    """'ensemble' holds the served prediction's accuracy, named by `served_label` (a method may serve one head)."""
    experts = [group_accuracy(correct[k], total, train_counts, rule) for k in range(len(correct) - 1)]
    return {"ensemble": group_accuracy(correct[-1], total, train_counts, rule), "served_label": served_label,
            "experts": experts, "best_expert": int(np.argmax([e["overall"] for e in experts])),
            "test_images": int(total.sum()), "shot_rule": rule}


def metrics_row(metrics: dict) -> dict:
    """The log.csv columns of an evaluation."""
    return {**{f"test_{k}": v for k, v in metrics["ensemble"].items()},
            **{f"test_expert{k}": e["overall"] for k, e in enumerate(metrics["experts"])}}


def format_metrics(m: dict) -> str:
    """One line; a shot group without classes (CIFAR-10-LT has no few-shot class) shows as '-'."""
    e = m["ensemble"]
    group = {name: "-" if np.isnan(e[name]) else f"{e[name]:.1f}" for name in ("many", "medium", "few")}
    experts = " ".join(f"{x['overall']:.1f}" for x in m["experts"])
    return (f"{m.get('served_label', 'ensemble')} {e['overall']:.2f} (many {group['many']} / medium {group['medium']} / few {group['few']})"
            f"  experts {experts}")
