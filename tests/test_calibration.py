"""The calibration split: every choice is made on a labelled split disjoint from the evaluation split, for every
dataset kind, and a dataset without one says so with the flag that names one."""
import hashlib
import json

import numpy as np
import pytest

from expertfuse.errors import UserError
from tests.test_data import _write_images, write_cifar10_tree
from train.data.datasets import build_calibration, build_data
from train.data.options import DataOptions


def identities(view) -> set:
    """What makes an image itself: its file where it has one, else its pixels."""
    base = view.base
    if hasattr(base, "samples"):
        root = getattr(base, "root", "")
        return {str(root) + "/" + str(base.samples[i][0]) for i in view.indices}
    return {hashlib.sha1(np.asarray(base[i][0]).tobytes()).hexdigest() for i in view.indices}


def image_list_root(tmp_path):
    """An ImageNet-LT-style root: train, val (2 per class) and test lists."""
    splits = {"train": 5, "val": 2, "test": 3}
    for split, n in splits.items():
        rows = [(f"{split}/n0{c}/{i}.jpg", c) for c in range(2) for i in range(n)]
        _write_images(tmp_path, [p for p, _ in rows])
        (tmp_path / f"ImageNet_LT_{split}.txt").write_text("".join(f"{p} {c}\n" for p, c in rows))
    return tmp_path


def image_folder_root(tmp_path, splits=("train", "test", "val")):
    for split in splits:
        _write_images(tmp_path, [f"{split}/{c}/{i}.png" for c in ("cat", "dog", "fox") for i in range(8)])
    return tmp_path


def build(tmp_path, kind):
    """(options, calibration split) for one dataset kind, and the split the choice is expected to come from."""
    if kind == "synthetic":
        opts = DataOptions(synthetic_classes=4, synthetic_max=40, synthetic_test=5)
    elif kind == "cifar10-lt":
        write_cifar10_tree(tmp_path)
        opts = DataOptions(dataset="cifar10-lt", data_root=str(tmp_path), imb_factor=10)
    elif kind == "imagenet-lt":
        opts = DataOptions(dataset="imagenet-lt", data_root=str(image_list_root(tmp_path)))
    elif kind == "imagefolder-val":
        opts = DataOptions(dataset="imagefolder", data_root=str(image_folder_root(tmp_path)), imb_factor=4)
    else:  # imagefolder without val/: the training images the long-tail subsample left out
        opts = DataOptions(dataset="imagefolder", data_root=str(image_folder_root(tmp_path, ("train", "test"))),
                           imb_factor=4)
    bundle = build_data(opts)
    return bundle, *build_calibration(opts, bundle, per_class=3)


@pytest.mark.parametrize("kind, what", [("synthetic", "synthetic seed 20000, 3 per class"),
                                        ("cifar10-lt", "held-out training images"),
                                        ("imagenet-lt", "ImageNet_LT_val.txt"), ("imagefolder-val", "val/"),
                                        ("imagefolder-heldout", "held-out training images")])
def test_calibration_split_is_disjoint_from_the_evaluation_split(tmp_path, kind, what):
    bundle, calibration, description = build(tmp_path, kind)
    assert description.startswith(what) and len(calibration) > 0
    assert not identities(calibration) & identities(bundle.test), "an image in both splits"
    if calibration.base is bundle.train.base:  # held out: never trained on either; the head class kept all its images
        assert not set(calibration.indices) & set(bundle.train.indices)
        assert np.bincount(calibration.targets, minlength=len(bundle.classes)).tolist() == [0] + [3] * (len(bundle.classes) - 1)
        assert description.endswith(f"none of {bundle.classes[0]} (every one trained on)")
    else:
        assert set(calibration.targets) == set(range(len(bundle.classes)))  # every class is there to choose on


def test_a_dataset_without_a_disjoint_split_names_the_flag(tmp_path):
    root = image_folder_root(tmp_path / "folder", ("train", "test"))
    opts = DataOptions(dataset="imagefolder", data_root=str(root), imb_factor=1)  # every training image trained on
    with pytest.raises(UserError, match="--calib-split FOLDER"):
        build_calibration(opts, build_data(opts))
    for bad in ("test", "train"):
        with pytest.raises(UserError, match="disjoint"):
            build_calibration(opts, build_data(opts), split=bad)
    lists = DataOptions(dataset="imagenet-lt", data_root=str(image_list_root(tmp_path / "lists")), eval_split="val")
    with pytest.raises(UserError, match="--calib-split LIST"):
        build_calibration(lists, build_data(lists))


def test_export_and_bench_name_the_split_that_chose_and_the_split_that_scored(tiny_checkpoint, tmp_path):
    from export.onnx import export_onnx
    model = export_onnx(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "repo"), "--early-exit", "auto",
                         "--max-batch", "8", "--eval-limit", "60"])
    report = json.loads((model / "1" / "export_report.json").read_text())["early_exit"]
    splits = report["splits"]
    assert splits["chosen_on"].startswith("synthetic calibration split (synthetic seed 20000")
    assert splits["scored_on"].startswith("synthetic evaluation split (synthetic seed 10000")
    auto = report["auto"]
    assert auto["chosen"]["ok"] and auto["chosen"]["threshold"] == report["threshold"]
    assert {"calibration", "evaluation"} <= set(auto["global_curve"][0]) and "why" in auto
    config = (model / "config.pbtxt").read_text()
    assert "expertfuse_early_exit_class_thresholds" in config and "expertfuse_early_exit_chosen_on" in config
