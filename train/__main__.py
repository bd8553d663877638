"""python -m train: train a multi-expert long-tailed classifier and write <out>/<method>.pt."""
import sys

from expertfuse.cli import run_cli
from train.config import config_from_args


def main() -> None:
    config = config_from_args()  # flags and values checked before torch is imported: a typo is refused at once
    from train.engine import train
    train(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
