"""python -m train: train a multi-expert long-tailed classifier and write <out>/<method>.pt."""
import sys

from expertfuse.cli import run_cli
from train.config import config_from_args
from train.training.lock import output_folder_lock


def main() -> None:
    # Flags, values, the --out folder's lock and --resume's checkpoint before torch is imported: a typo, a second
    # run into a busy folder or nothing to resume is refused at once.
    config = config_from_args()
    with output_folder_lock(config):
        if config.resume:
            config.resume_checkpoint()
        from train.engine import train
        train(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
