"""Which data a run reads: the data flags' values, kept free of torch so that a command line parses (and its
errors show) before torch is imported."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataOptions:
    dataset: str = "synthetic"
    data_root: str = "data"
    imb_factor: float = 100.0
    lt_profile: str = "exp"
    subset_mode: str = "shuffle"
    download: bool = False
    eval_split: str = "test"
    train_list: str = ""
    eval_list: str = ""
    synthetic_classes: int = 10
    synthetic_max: int = 300
    synthetic_test: int = 100
    synthetic_seed: int = 0
