"""What training writes besides checkpoints: log.csv (rewritten atomically each epoch) and TensorBoard."""
from __future__ import annotations

import csv
from pathlib import Path

from expertfuse.files import atomic_path


class CsvLog:
    """log.csv, one row per epoch; on resume the rows of the epochs kept are read back first."""

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
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(self.rows)


class EpochLogs:
    """log.csv and, with --tensorboard, TensorBoard scalars: written by the main process only."""

    def __init__(self, out: Path, keep_epochs: int, tensorboard: bool):
        self.csv = CsvLog(out / "log.csv", keep_epochs)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))

    def append(self, row: dict) -> None:
        self.csv.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
