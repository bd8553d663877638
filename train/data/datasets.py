"""Dataset builders: every source becomes (train view, test view, class names, training counts).

Sources: the embedded synthetic set; CIFAR-10/100-LT through torchvision (pass --download);
ImageNet-LT / Places-LT / iNaturalist-2018 image lists in the OLTR text format or NCL's JSON;
ImageFolder trees (split/<class>/*.jpg) with long-tail subsampling of the train split.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from train.data import synthetic
from train.data.longtail import longtail_counts, select_longtail
from train.data.options import DataOptions
from expertfuse.errors import UserError
from expertfuse.preprocess import load_rgb

if TYPE_CHECKING:
    import torchvision

DATASETS = ("synthetic", "cifar10-lt", "cifar100-lt", "imagenet-lt", "places-lt", "inat2018", "imagefolder")
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INAT_MEAN, INAT_STD = [0.466, 0.471, 0.380], [0.195, 0.194, 0.192]


@dataclass(frozen=True)
class Geometry:
    """What a network for a dataset needs to know of it without reading it: classes, input size, test-time resize,
    normalization (a preset's network at real size, for export and cost, before any data is there)."""
    num_classes: int
    input_size: int
    resize: int
    mean: list[float]
    std: list[float]


DATASET_GEOMETRY = {
    "cifar10-lt": Geometry(10, 32, 32, CIFAR_MEAN, CIFAR_STD),
    "cifar100-lt": Geometry(100, 32, 32, CIFAR_MEAN, CIFAR_STD),
    "imagenet-lt": Geometry(1000, 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "places-lt": Geometry(365, 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "inat2018": Geometry(8142, 224, 256, INAT_MEAN, INAT_STD),
}
# OLTR list names per dataset: (train, val, test). iNaturalist's official val set is its test set.
IMAGE_LISTS = {
    "imagenet-lt": ("ImageNet_LT_train", "ImageNet_LT_val", "ImageNet_LT_test"),
    "places-lt": ("Places_LT_train", "Places_LT_val", "Places_LT_test"),
    "inat2018": ("iNaturalist18_train", "iNaturalist18_val", "iNaturalist18_val"),
}


@dataclass
class DataBundle:
    """Raw-image datasets plus what the model spec and the metrics need to know about them."""
    train: "LabeledView"
    test: "LabeledView"
    classes: list[str]
    train_counts: list[int]
    input_size: int = 32
    resize: int = 32
    mean: list[float] = field(default_factory=lambda: list(CIFAR_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR_STD))
    augment: str = "cifar"
    test_name: str = "the test split"  # what the evaluation split is, for reports


class LabeledView(Dataset):
    """A subset of a base dataset whose items are (image, label), with a transform set once the model is known."""

    def __init__(self, base: Dataset, targets, indices=None):
        self.base = base
        self.indices = list(range(len(targets))) if indices is None else list(indices)
        self.targets = [int(targets[i]) for i in self.indices]
        self.transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, _ = self.base[self.indices[i]]
        return (self.transform(image) if self.transform else image), self.targets[i]


class ArrayImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class ImageList(Dataset):
    """(path, label) pairs read as 8-bit RGB (16-bit images scaled, not clipped)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]]):
        self.root, self.samples = root, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_rgb(self.root / path), label


def _counts(targets, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()


# synthetic: training draws seed s, evaluation s + EVALUATION_SEED, calibration s + CALIBRATION_SEED
EVALUATION_SEED, CALIBRATION_SEED = 10_000, 20_000


def _build_synthetic(opt: DataOptions) -> DataBundle:
    counts = longtail_counts(opt.synthetic_max, opt.synthetic_classes, opt.imb_factor, opt.lt_profile)
    train_x, train_y = synthetic.synthesize(counts, seed=opt.synthetic_seed)
    test_x, test_y = synthetic.synthesize([opt.synthetic_test] * opt.synthetic_classes,
                                          seed=opt.synthetic_seed + EVALUATION_SEED)
    classes = [f"pattern{c}" for c in range(opt.synthetic_classes)]
    return DataBundle(LabeledView(ArrayImages(train_x, train_y), train_y),
                      LabeledView(ArrayImages(test_x, test_y), test_y), classes, counts,
                      mean=synthetic.MEAN, std=synthetic.STD, augment="cifar-basic",
                      test_name=f"synthetic seed {opt.synthetic_seed + EVALUATION_SEED}")


def _cifar_class(num_classes: int):
    import torchvision  # here and below, not at the top: importing torchvision costs every CLI a second
    base = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100

    class CifarTree(base):
        """torchvision's CIFAR reader and downloader. The archive's MD5 is still checked on download;
        extracted batches are only required to exist, so re-packed trees (e.g. JPEG round-trips) load."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return CifarTree


def _build_cifar(opt: DataOptions, num_classes: int) -> DataBundle:
    cls = _cifar_class(num_classes)
    try:
        train = cls(opt.data_root, train=True, download=opt.download)
        test = cls(opt.data_root, train=False, download=opt.download)
    except RuntimeError as exc:
        raise UserError(f"CIFAR-{num_classes} not found under {opt.data_root!r} ({exc}); "
                        "pass --download to fetch it, or --data-root to point at it") from None
    n_max = min(_counts(train.targets, num_classes))
    counts = longtail_counts(n_max, num_classes, opt.imb_factor, opt.lt_profile)
    kept = select_longtail(train.targets, counts, opt.subset_mode, seed=0)
    return DataBundle(LabeledView(train, train.targets, kept), LabeledView(test, test.targets),
                      list(train.classes), counts)


def read_image_list(path: Path) -> list[tuple[str, int]]:
    """OLTR text (`relative/path label` per line) or NCL JSON (`annotations[{fpath, category_id}]`)."""
    if not path.is_file():
        raise UserError(f"image list not found: {path}")
    if path.suffix == ".json":
        with open(path) as f:
            data = json.load(f)
        try:
            return [(a["fpath"], int(a["category_id"])) for a in data["annotations"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not an NCL annotation file (annotations[{{fpath, category_id}}])") from None
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        samples.append((parts[0], int(parts[1])))
    return samples


def _find_list(root: Path, explicit: str, stem: str) -> Path:
    if explicit:
        return Path(explicit) if Path(explicit).is_absolute() else root / explicit
    for suffix in (".txt", ".json"):
        if (root / (stem + suffix)).is_file():
            return root / (stem + suffix)
    raise UserError(f"no {stem}.txt or {stem}.json under {root}; pass --train-list/--eval-list")


def _class_names(samples: list[tuple[str, int]], num_classes: int) -> list[str]:
    """The parent folder of each class's first image (ImageNet wnids, Places scene names), else class_<i>."""
    names = {}
    for path, label in samples:
        names.setdefault(label, Path(path).parent.name)
    if len(set(names.values())) != len(names):
        return [f"class_{c}" for c in range(num_classes)]
    return [names.get(c, f"class_{c}") for c in range(num_classes)]


def _build_image_list(opt: DataOptions) -> DataBundle:
    root = Path(opt.data_root)
    train_stem, val_stem, test_stem = IMAGE_LISTS[opt.dataset]
    if opt.eval_split not in ("val", "test"):
        raise UserError("--eval-split must be val or test")
    train_samples = read_image_list(_find_list(root, opt.train_list, train_stem))
    eval_file = _find_list(root, opt.eval_list, val_stem if opt.eval_split == "val" else test_stem)
    eval_samples = read_image_list(eval_file)
    num_classes = max(label for _, label in train_samples + eval_samples) + 1
    train_targets = [label for _, label in train_samples]
    mean, std = (INAT_MEAN, INAT_STD) if opt.dataset == "inat2018" else (IMAGENET_MEAN, IMAGENET_STD)
    return DataBundle(LabeledView(ImageList(root, train_samples), train_targets),
                      LabeledView(ImageList(root, eval_samples), [label for _, label in eval_samples]),
                      _class_names(train_samples, num_classes), _counts(train_targets, num_classes),
                      input_size=224, resize=256, mean=mean, std=std, augment="imagenet", test_name=eval_file.name)


class ImageFiles:
    """ImageFolder's file filter: an image extension and a header PIL can read (opening reads only the header,
    so the check is cheap); everything else is skipped and remembered, so one warning can count and name it."""

    def __init__(self):
        from torchvision.datasets.folder import IMG_EXTENSIONS  # here, not at the top: see _cifar_class
        self.extensions = IMG_EXTENSIONS
        self.skipped: list[str] = []

    def __call__(self, path: str) -> bool:
        if path.lower().endswith(self.extensions):
            try:
                with Image.open(path):
                    return True
            except (UnidentifiedImageError, OSError):
                pass
        self.skipped.append(path)
        return False

    def warn(self) -> None:
        if self.skipped:
            print(f"warning: skipped {len(self.skipped)} files that are not images (e.g. {self.skipped[0]})",
                  file=sys.stderr)


def _image_folder(split: Path, images: ImageFiles) -> torchvision.datasets.ImageFolder:
    import torchvision
    try:
        return torchvision.datasets.ImageFolder(split, loader=load_rgb, is_valid_file=images)
    except FileNotFoundError as exc:  # a class folder without a single image
        raise UserError(f"{split}: {str(exc).split('. ')[0]}; put images in every class folder") from None


def _build_image_folder(opt: DataOptions) -> DataBundle:
    root = Path(opt.data_root)
    eval_dir = next((root / s for s in (opt.eval_split, "test", "val") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or eval_dir is None:
        raise UserError(f"{root} must hold train/<class>/*.jpg and test/ (or val/) with the same classes")
    images = ImageFiles()
    train, test = _image_folder(root / "train", images), _image_folder(eval_dir, images)
    images.warn()
    if train.classes != test.classes:
        raise UserError(f"{root}: train and {eval_dir.name} have different class folders")
    num_classes = len(train.classes)
    kept = None
    counts = _counts(train.targets, num_classes)
    if opt.imb_factor > 1:
        counts = longtail_counts(min(counts), num_classes, opt.imb_factor, opt.lt_profile)
        kept = select_longtail(train.targets, counts, opt.subset_mode, seed=0)
    with Image.open(train.samples[0][0]) as first:
        small = max(first.size) <= 64
    size = dict(input_size=max(first.size), resize=max(first.size), augment="cifar") if small else \
        dict(input_size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="imagenet")
    return DataBundle(LabeledView(train, train.targets, kept), LabeledView(test, test.targets),
                      list(train.classes), counts, test_name=f"{eval_dir.name}/", **size)


HELD_OUT_SEED = 0  # the NumPy seed that draws the held-out calibration images


def _held_out(bundle: DataBundle, per_class: int) -> tuple[LabeledView, str]:
    """Training images the long-tail subsample left out (never trained on), `per_class` of each class drawn with
    NumPy seed HELD_OUT_SEED (all of a class's when it has fewer). The head class keeps all its images (CIFAR-LT:
    5000 of 5000), so it has none to give: the split goes without it and says so."""
    view = bundle.train
    targets = np.asarray(view.base.targets)
    unused = np.setdiff1d(np.arange(len(targets)), view.indices)
    rng, picked, missing = np.random.RandomState(HELD_OUT_SEED), [], []
    for c in range(len(bundle.classes)):
        pool = unused[targets[unused] == c]
        if not len(pool):
            missing.append(bundle.classes[c])
        picked += rng.choice(pool, min(per_class, len(pool)), replace=False).tolist()
    if not picked:
        raise UserError("every training image is in the long-tail subsample: none is left to calibrate on; name a "
                        "split with --calib-split")
    what = f"held-out training images (not in the long-tail subsample), {per_class} per class, seed {HELD_OUT_SEED}"
    return (LabeledView(view.base, targets, sorted(picked)),
            what + (f"; none of {', '.join(missing)} (every one trained on)" if missing else ""))


def _calibration_list(opt: DataOptions, bundle: DataBundle, split: str) -> tuple[LabeledView, str]:
    """Image lists: the dataset's val list when evaluation reads the test list, or the list `split` names."""
    root, (_, val_stem, test_stem) = Path(opt.data_root), IMAGE_LISTS[opt.dataset]
    if split == "auto":
        if opt.eval_split != "test" or opt.eval_list or val_stem == test_stem:
            raise UserError(f"{opt.dataset}: evaluation reads {bundle.test_name}, which leaves no split disjoint from "
                            "it to choose on; name one with --calib-split LIST (or evaluate with --eval-split test)")
        split = ""
    path = _find_list(root, split, val_stem)
    samples = read_image_list(path)
    shared = {p for p, _ in samples} & {p for p, _ in bundle.test.base.samples}
    if shared:
        raise UserError(f"{path.name} shares {len(shared)} images with the evaluation list {bundle.test_name} "
                        f"(e.g. {sorted(shared)[0]}); name a disjoint one with --calib-split LIST")
    return LabeledView(ImageList(root, samples), [label for _, label in samples]), path.name


def _calibration_folder(opt: DataOptions, bundle: DataBundle, split: str, per_class: int) -> tuple[LabeledView, str]:
    """ImageFolder: val/ when evaluation reads test/, else the training images the long-tail subsample left out,
    or the folder `split` names."""
    root, eval_dir = Path(opt.data_root), Path(bundle.test.base.root).name
    subsampled = len(bundle.train) < len(bundle.train.base)
    if split == "auto":
        if eval_dir == "test" and (root / "val").is_dir():
            split = "val"
        elif subsampled:
            return _held_out(bundle, per_class)
        else:
            raise UserError(f"{root}: no split disjoint from {eval_dir}/ to choose on (evaluation reads {eval_dir}/ and "
                            "every training image is trained on): add val/<class>/ beside test/, or name a folder "
                            "with --calib-split FOLDER")
    if split in (eval_dir, "train"):
        raise UserError(f"--calib-split {split}: the calibration split must be disjoint from the evaluation split "
                        f"({eval_dir}/) and from the images trained on (train/)")
    if not (root / split).is_dir():
        raise UserError(f"--calib-split {split}: no folder {root / split}")
    images = ImageFiles()
    folder = _image_folder(root / split, images)
    images.warn()
    if folder.classes != bundle.classes:
        raise UserError(f"{root}: train and {split} have different class folders")
    return LabeledView(folder, folder.targets), f"{split}/"


def build_calibration(opt: DataOptions, bundle: DataBundle, split: str = "auto",
                      per_class: int = 0) -> tuple[LabeledView, str]:
    """A labelled split disjoint from the evaluation split (and from the images trained on), on which every choice
    is made (early-exit thresholds and expert order, INT8 calibration, the best single expert), so the evaluation
    split only scores. `split`: auto (the dataset's own), heldout (training images the long-tail subsample left
    out), or a list file / folder under --data-root. `per_class` (held-out and synthetic): images per class,
    0 for as many as the evaluation split has on average. Returns the view and what it is, for reports."""
    per_class = per_class or max(1, round(len(bundle.test) / len(bundle.classes)))
    if opt.dataset == "synthetic":
        if split != "auto":
            raise UserError("synthetic data calibrates on its own seed; --calib-split takes only auto there")
        seed = opt.synthetic_seed + CALIBRATION_SEED
        x, y = synthetic.synthesize([per_class] * len(bundle.classes), seed=seed)
        return LabeledView(ArrayImages(x, y), y), f"synthetic seed {seed}, {per_class} per class"
    if split == "heldout" or (split == "auto" and opt.dataset in ("cifar10-lt", "cifar100-lt")):
        if opt.dataset in IMAGE_LISTS:
            raise UserError(f"{opt.dataset} trains on its whole training list; --calib-split heldout needs a "
                            "long-tail subsample (CIFAR-LT, ImageFolder)")
        return _held_out(bundle, per_class)
    if opt.dataset in IMAGE_LISTS:
        return _calibration_list(opt, bundle, split)
    if opt.dataset == "imagefolder":
        return _calibration_folder(opt, bundle, split, per_class)
    raise UserError(f"--calib-split {split}: CIFAR-LT calibrates on its held-out training images (auto or heldout)")


def build_data(opt: DataOptions) -> DataBundle:
    if opt.dataset == "synthetic":
        return _build_synthetic(opt)
    if opt.dataset in ("cifar10-lt", "cifar100-lt"):
        return _build_cifar(opt, 10 if opt.dataset == "cifar10-lt" else 100)
    if opt.dataset in IMAGE_LISTS:
        return _build_image_list(opt)
    if opt.dataset == "imagefolder":
        return _build_image_folder(opt)
    raise UserError(f"unknown dataset {opt.dataset!r}; choose from {', '.join(DATASETS)}")
