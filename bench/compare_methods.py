"""python -m bench.compare_methods: the CE baseline and the four methods on the same synthetic long-tailed
data and the same short schedule, through the real training CLI; writes a markdown table.

  python -m bench.compare_methods [--epochs 6] [--arch resnet20] [--out bench/results/methods-synthetic]

Every run: 10 synthetic classes at IF 100, batch 64, peak LR 0.02, 2 warmup epochs then cosine, seed 42.
SHIKE adds 2 epochs of classifier re-training; SSD runs its stages I and III for the full schedule each
(plus one LWS epoch), so it trains about twice as long. SSD is reported by its soft head.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from train.checkpoint import load_checkpoint

COMMON = ["--dataset", "synthetic", "--batch-size", "64", "--lr", "0.02", "--schedule", "cosine", "--warmup-epochs",
          "2", "--eta-min", "0.001", "--seed", "42"]


def runs(epochs: int) -> dict[str, list[str]]:
    e = str(epochs)
    return {"ce": ["--method", "ce", "--epochs", e],
            "ncl": ["--method", "ncl", "--hcm-n", "3", "--epochs", e],
            "shike": ["--method", "shike", "--shortcut", "B", "--shared-stages", "3", "--fusion", "dkf", "--head", "normed",
                      "--head-scale", "30", "--no-nesterov", "--epochs", e, "--crt-epochs", "2", "--crt-lr", "0.1"],
            "ecl": ["--method", "ecl", "--epochs", e],
            "ssd": ["--method", "ssd", "--epochs", e, "--ssd-slg-epochs", "1", "--ssd-sdl-epochs", e,
                    "--moco-queue", "256", "--moco-dim", "32"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--methods", default="ce,ncl,shike,ecl,ssd")
    p.add_argument("--out", type=Path, default=Path("bench/results/methods-synthetic"))
    a = p.parse_args(argv)
    rows = []
    for method in a.methods.split(","):
        out = a.out / "runs" / method
        command = [sys.executable, "-m", "train", *COMMON, "--arch", a.arch, *runs(a.epochs)[method], "--out", str(out)]
        print(f"$ python -m train {' '.join(command[3:])}", flush=True)
        started = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        data = load_checkpoint(out / f"{method}.pt")
        m = data["metrics"]
        acc = m["ensemble"]  # what the method deploys: SSD its soft head, the others the ensemble
        rows.append({"method": method, "epochs": data["epoch"], "seconds": time.monotonic() - started, **acc,
                     "best_single": max(e["overall"] for e in m["experts"])})
        print(f"  {method}: {acc['overall']:.1f}% (many {acc['many']:.1f} / medium {acc['medium']:.1f} / "
              f"few {acc['few']:.1f}), best single {rows[-1]['best_single']:.1f}%", flush=True)
    lines = [f"# Methods on the synthetic long-tailed set ({a.arch}, {a.epochs}-epoch schedule, CPU)", "",
             f"torch {torch.__version__}; `python -m bench.compare_methods --epochs {a.epochs} --arch {a.arch}`", "",
             "| method | epochs | overall | many | medium | few | best single expert/head | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['epochs']} | {r['overall']:.1f} | {r['many']:.1f} | {r['medium']:.1f} | "
              f"{r['few']:.1f} | {r['best_single']:.1f} | {r['seconds']:.0f} |" for r in rows]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
