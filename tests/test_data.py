import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.datasets import build_data, read_image_list
from train.data.options import DataOptions
from train.data.synthetic import BOTH_VIEWS, _layout, badge_attributes, class_attributes, synthesize
from train.data.transforms import eval_transform, train_transform
from expertfuse.errors import UserError
from train.models import ModelSpec


def write_cifar10_tree(root, per_class_train=20, per_class_test=3):
    """A real CIFAR-10 python-pickle tree (the format torchvision downloads), with a few random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    labels = np.tile(np.arange(10), per_class_train)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        batch = {"data": rng.randint(0, 256, (len(part), 3072), dtype=np.uint8), "labels": labels[part].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {"data": rng.randint(0, 256, (10 * per_class_test, 3072), dtype=np.uint8),
            "labels": np.tile(np.arange(10), per_class_test).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_lt_from_a_pickle_tree(tmp_path):
    write_cifar10_tree(tmp_path)
    data = build_data(DataOptions(dataset="cifar10-lt", data_root=str(tmp_path), imb_factor=10))
    assert data.train_counts == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert len(data.train) == sum(data.train_counts) and len(data.test) == 30
    assert np.bincount(data.train.targets).tolist() == data.train_counts
    assert data.classes[9] == "truck"
    image, label = data.train[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="pass --download"):
        build_data(DataOptions(dataset="cifar100-lt", data_root=str(tmp_path)))


def _write_images(root, paths):
    for i, rel in enumerate(paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 50, 3), i * 20 % 256, dtype=np.uint8)).save(root / rel)


def test_oltr_text_and_ncl_json_lists(tmp_path):
    train = [("train/n01/a.jpg", 0), ("train/n01/b.jpg", 0), ("train/n01/c.jpg", 0), ("train/n02/d.jpg", 1)]
    test = [("val/n01/e.jpg", 0), ("val/n02/f.jpg", 1)]
    _write_images(tmp_path, [p for p, _ in train + test])
    (tmp_path / "ImageNet_LT_train.txt").write_text("".join(f"{p} {l}\n" for p, l in train))
    annotations = [{"image_id": i, "fpath": p, "im_height": 40, "im_width": 50, "category_id": l}
                   for i, (p, l) in enumerate(test)]
    (tmp_path / "ImageNet_LT_test.json").write_text(json.dumps({"annotations": annotations, "num_classes": 2}))
    data = build_data(DataOptions(dataset="imagenet-lt", data_root=str(tmp_path)))
    assert data.train_counts == [3, 1] and data.classes == ["n01", "n02"] and len(data.test) == 2
    assert (data.input_size, data.resize, data.augment) == (224, 256, "imagenet")
    spec = ModelSpec(arch="resnet50", num_classes=2, input_size=data.input_size, resize=data.resize,
                     mean=data.mean, std=data.std)
    data.test.transform = eval_transform(spec)
    image, label = data.test[1]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 1
    (tmp_path / "bad.txt").write_text("just-a-path\n")
    with pytest.raises(UserError, match="bad.txt:1: expected 'relative/path label'"):
        read_image_list(tmp_path / "bad.txt")


def test_image_folder_is_subsampled_long_tailed(tmp_path):
    classes = ["cat", "dog", "fox"]
    _write_images(tmp_path, [f"train/{c}/{i}.png" for c in classes for i in range(8)] +
                  [f"test/{c}/{i}.png" for c in classes for i in range(2)])
    data = build_data(DataOptions(dataset="imagefolder", data_root=str(tmp_path), imb_factor=4))
    assert data.classes == classes and data.train_counts == [8, 4, 2] and len(data.train) == 14
    assert data.augment == "cifar" and data.input_size == 50  # small images get the CIFAR-style pipeline


def test_synthetic_is_deterministic_and_long_tailed():
    data = build_data(DataOptions(dataset="synthetic", imb_factor=100))
    assert data.train_counts[0] == 300 and data.train_counts[-1] == 3 and len(data.test) == 1000
    a, _ = synthesize([3, 2], seed=5)
    b, _ = synthesize([3, 2], seed=5)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == (5, 32, 32, 3)


@pytest.mark.parametrize("num_classes", [10, 20, 30])
def test_synthetic_classes_are_confusable_combinations_of_shared_attributes(num_classes):
    """In each view no single attribute names a class (each colour, orientation, ring frequency is shared), but every
    combination is unique, so a class can be told from either view alone."""
    rgb, angle, freq = class_attributes(num_classes)
    badge_rgb, ring_freq = badge_attributes(num_classes)
    stripes = {(tuple(c.round(6)), round(a, 6), f) for c, a, f in zip(rgb, angle, freq)}
    badges = {(tuple(c.round(6)), round(f, 6)) for c, f in zip(badge_rgb, ring_freq)}
    assert len(stripes) == len(badges) == num_classes
    for values in (rgb.round(6).tolist(), angle.round(6).tolist(), badge_rgb.round(6).tolist()):
        assert min(values.count(v) for v in values) >= 2


def test_synthetic_images_show_both_views_or_one():
    show_stripes, show_badge, _, _ = _layout(np.random.RandomState(0), 20_000)
    both, stripes_only, badge_only = (show_stripes & show_badge).mean(), (show_stripes & ~show_badge).mean(), \
        (~show_stripes & show_badge).mean()
    assert (show_stripes | show_badge).all() and abs(both - BOTH_VIEWS) < 0.02
    assert abs(stripes_only - badge_only) < 0.02 and abs(stripes_only + badge_only + both - 1) < 1e-9


@pytest.mark.parametrize("name", ["cifar", "cifar-basic", "imagenet", "none"])
def test_augmentation_presets_produce_normalized_tensors(name):
    spec = ModelSpec(input_size=32, resize=32)
    torch.manual_seed(0)
    out = train_transform(name, spec)(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.min() < 0 < out.max()


def test_image_folder_skips_files_that_are_not_images_with_one_warning(tmp_path, capsys):
    classes = ["cat", "dog"]
    _write_images(tmp_path, [f"train/{c}/{i}.png" for c in classes for i in range(4)] +
                  [f"test/{c}/{i}.png" for c in classes for i in range(2)])
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not really a jpeg")
    (tmp_path / "test" / "dog" / "notes.txt").write_text("taken on a sunny day")
    data = build_data(DataOptions(dataset="imagefolder", data_root=str(tmp_path), imb_factor=1))
    assert data.train_counts == [4, 4] and len(data.test) == 4
    assert capsys.readouterr().err == f"warning: skipped 2 files that are not images (e.g. {tmp_path}/train/cat/broken.jpg)\n"
    data.train.transform = data.test.transform = None
    assert all(image.size == (50, 40) for image, _ in data.train)  # every kept file loads


def test_image_folder_class_without_images_is_one_line(tmp_path):
    _write_images(tmp_path, ["train/cat/0.png", "test/cat/0.png", "test/dog/0.png"])
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"train: Found no valid file for the classes dog; put images in every class"):
        build_data(DataOptions(dataset="imagefolder", data_root=str(tmp_path), imb_factor=1))
