"""python -m train: train a multi-expert long-tailed classifier and write <out>/<method>.pt."""
import sys

from expertfuse.cli import run_cli
from train.config import config_from_args
from train.training.lock import output_folder_lock


def main() -> None:
    config = config_from_args()  # flags, values and the --out folder's lock before torch is imported: a typo or
    with output_folder_lock(config):  # a second run into a busy folder is refused at once
        from train.engine import train
        train(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
