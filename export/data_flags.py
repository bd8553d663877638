"""The labelled-data flags that export (--int8, --early-exit) and bench share: the training CLI's data flags plus
the evaluation cap and the calibration split. Free of torch, so a command parses its flags (and refuses bad ones)
before it imports torch; export.labelled reads the data they name."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from expertfuse.errors import UserError
from train.config import TrainConfig
from train.data.options import DataOptions

DATA_FLAGS = [f.name for f in fields(DataOptions)]


@dataclass
class LabelledData:
    """Which labelled data to read: training data flags overriding the checkpoint's, an image cap (0: all) on each
    split, and which calibration split to choose on (build_calibration's `split` and `per_class`)."""
    overrides: dict = field(default_factory=dict)
    limit: int = 0
    calib_split: str = "auto"
    calib_per_class: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LabelledData":
        if args.eval_limit < 0 or args.calib_per_class < 0:
            raise UserError("--eval-limit and --calib-per-class must be 0 (all images / the default) or more")
        return cls({n: getattr(args, n) for n in DATA_FLAGS if getattr(args, n, None) is not None}, args.eval_limit,
                   args.calib_split, args.calib_per_class)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The training CLI's data flags (same names and help), defaulting to what the checkpoint recorded."""
    group = p.add_argument_group("labelled data (default: the checkpoint's own evaluation split)")
    help_of = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    for name in DATA_FLAGS:
        default = getattr(DataOptions(), name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of.get(name))
        else:
            group.add_argument(flag, type=type(default), default=None, help=help_of.get(name))
    group.add_argument("--eval-limit", type=int, default=0, help="evaluate (and calibrate) on at most this many "
                       "images, every class kept (0: all)")
    group.add_argument("--calib-split", default="auto", metavar="auto|heldout|LIST|FOLDER",
                       help="the labelled split every choice is made on, disjoint from the evaluation split: auto (the "
                            "dataset's: synthetic another seed, CIFAR-LT held-out training images, ImageNet-LT/Places-LT "
                            "the val list, ImageFolder val/ or held-out training images), heldout, a list file or a "
                            "folder under --data-root [auto]")
    group.add_argument("--calib-per-class", type=int, default=0,
                       help="held-out / synthetic calibration images per class (0: as many as the evaluation split) [0]")


CALIB_FLAGS = ("calib_split", "calib_per_class")  # the calibration flags' argparse names
