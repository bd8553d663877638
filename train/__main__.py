"""python -m train: train a multi-expert long-tailed classifier and write <out>/<method>.pt."""
import sys

from expertfuse.cli import run_cli
from train.config import config_from_args
from train.engine import train

if __name__ == "__main__":
    sys.exit(run_cli(lambda: train(config_from_args())))
