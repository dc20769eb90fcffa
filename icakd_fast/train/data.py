"""Datasets for the trainer: ``synthetic`` (embedded), CIFAR-10/100, Tiny-ImageNet and ImageNet.

Real datasets are read from their standard on-disk formats:

* CIFAR-10/100: the "python version" pickled batches (``cifar-10-batches-py/``,
  ``cifar-100-python/``), as torchvision downloads them (``--download``).
* Tiny-ImageNet: ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and
  ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``.
* ImageNet: ``train/<class>/*`` and ``val/<class>/*`` (torchvision ``ImageFolder`` layout).
"""

from __future__ import annotations

import itertools
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from .errors import UserError
from .synthetic import MEAN as SYN_MEAN, STD as SYN_STD, SyntheticShapes

__all__ = ["DATASETS", "DatasetBundle", "build_datasets", "canonical_dataset", "CifarDataset", "TinyImageNet",
           "find_cifar_dir", "EpochBatches"]

DATASETS = ("synthetic", "cifar10", "cifar100", "tiny-imagenet", "imagenet")
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXT = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class DatasetBundle:
    """The train/test splits of one dataset plus what the trainer needs to know about it."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str] = field(default_factory=list)


def _vision():
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms import v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("real datasets need torchvision: pip install 'icakd_fast[vision]'") from exc
    return v2


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", label_key=b"labels",
                    names_key=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     label_key=b"fine_labels", names_key=b"fine_label_names"),
}


def find_cifar_dir(name: str, data_dir: str | os.PathLike) -> Path | None:
    """The folder holding the pickled batches: ``data_dir/<standard folder>`` or ``data_dir``."""
    spec = _CIFAR[name]
    root = Path(data_dir)
    for cand in (root / spec["folder"], root):
        if all((cand / f).is_file() for f in spec["train"] + spec["test"]):
            return cand
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as exc:  # noqa: BLE001 - any decoding problem is a bad file
            raise UserError(f"{path}: not a CIFAR python-format batch ({exc})") from exc


class CifarDataset(Dataset):
    """CIFAR-10/100 from the pickled "python version" batches; ``transform`` gets a uint8 [3,32,32]."""

    def __init__(self, name: str, folder: str | os.PathLike, *, train: bool,
                 transform: Callable | None = None) -> None:
        spec = _CIFAR[name]
        folder = Path(folder)
        images, labels = [], []
        for fname in spec["train" if train else "test"]:
            entry = _unpickle(folder / fname)
            if b"data" not in entry or spec["label_key"] not in entry:
                raise UserError(f"{folder / fname}: missing 'data' or "
                                f"'{spec['label_key'].decode()}' (is this {name}?)")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise UserError(f"{folder / fname}: expected data of shape [N, 3072], got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry[spec["label_key"]])
        self.data = torch.from_numpy(np.concatenate(images))
        self.targets = labels
        meta_path = folder / spec["meta"]
        self.classes = []
        if meta_path.is_file():
            meta = _unpickle(meta_path)
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec["names_key"], [])]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.data[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]


def _cifar(name: str, data_dir: str | None, download: bool) -> DatasetBundle:
    if not data_dir:
        raise UserError(f"--data-dir is required for {name}")
    folder = find_cifar_dir(name, data_dir)
    if folder is None and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        try:
            cls(str(data_dir), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise UserError(f"could not download {name} into {data_dir}: {exc}") from exc
        folder = find_cifar_dir(name, data_dir)
    if folder is None:
        hint = "" if download else " (add --download to fetch it)"
        raise UserError(f"{name} not found in {data_dir}: expected {_CIFAR[name]['folder']}/ "
                        f"with {', '.join(_CIFAR[name]['train'][:1] + _CIFAR[name]['test'])}{hint}")
    v2 = _vision()
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *norm])
    test_tf = v2.Compose(norm)
    train = CifarDataset(name, folder, train=True, transform=train_tf)
    test = CifarDataset(name, folder, train=False, transform=test_tf)
    num_classes = 10 if name == "cifar10" else 100
    bad = [y for y in train.targets + test.targets if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"{folder}: label {bad[0]} out of range for {name}")
    return DatasetBundle(name, train, test, num_classes, 32, CIFAR_MEAN, CIFAR_STD, train.classes)


# ----------------------------------------------------------------------------- image folders

def _load_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class _FileList(Dataset):
    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None):
        self.samples = samples
        self.targets = [y for _, y in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, y = self.samples[i]
        x = _load_rgb(path)
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class TinyImageNet(_FileList):
    """Tiny-ImageNet-200 in its distributed layout (val labels from ``val_annotations.txt``)."""

    def __init__(self, root: str | os.PathLike, *, train: bool, transform: Callable | None = None) -> None:
        root = Path(root)
        wnids_file = root / "wnids.txt"
        if not wnids_file.is_file():
            raise UserError(f"{root}: no wnids.txt (expected the tiny-imagenet-200 folder)")
        classes = sorted({ln.strip() for ln in wnids_file.read_text().splitlines() if ln.strip()})
        index = {w: i for i, w in enumerate(classes)}
        samples: list[tuple[str, int]] = []
        if train:
            for w in classes:
                d = root / "train" / w / "images"
                if not d.is_dir():
                    d = root / "train" / w
                if not d.is_dir():
                    raise UserError(f"{root}: missing train/{w}/images")
                samples.extend((str(p), index[w]) for p in sorted(d.iterdir()) if p.suffix.lower() in _IMG_EXT)
        else:
            ann = root / "val" / "val_annotations.txt"
            if not ann.is_file():
                raise UserError(f"{root}: missing val/val_annotations.txt")
            for n, line in enumerate(ann.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                cols = line.split("\t") if "\t" in line else line.split()
                if len(cols) < 2 or cols[1] not in index:
                    raise UserError(f"{ann}:{n}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
                path = root / "val" / "images" / cols[0]
                if not path.is_file():
                    raise UserError(f"{ann}:{n}: image {path} not found")
                samples.append((str(path), index[cols[1]]))
        if not samples:
            raise UserError(f"{root}: no {'train' if train else 'val'} images found")
        super().__init__(samples, classes, transform)


def _tiny(data_dir: str | None) -> DatasetBundle:
    if not data_dir:
        raise UserError("--data-dir is required for tiny-imagenet")
    root = Path(data_dir)
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    if not root.is_dir():
        raise UserError(f"tiny-imagenet directory not found: {data_dir}")
    v2 = _vision()
    norm = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(64, scale=(0.35, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), *norm])
    test_tf = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(64), *norm])
    train = TinyImageNet(root, train=True, transform=train_tf)
    test = TinyImageNet(root, train=False, transform=test_tf)
    return DatasetBundle("tiny-imagenet", train, test, len(train.classes), 64, IMAGENET_MEAN, IMAGENET_STD,
                         train.classes)


def _scan_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
            samples.extend((os.path.join(dirpath, f), i) for f in sorted(files) if f.lower().endswith(_IMG_EXT))
    return samples, classes


def _imagenet(data_dir: str | None, image_size: int | None) -> DatasetBundle:
    if not data_dir:
        raise UserError("--data-dir is required for imagenet")
    root = Path(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"imagenet: {root / split} not found (expected train/<class>/* and val/<class>/*)")
    size = image_size or 224
    v2 = _vision()
    norm = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *norm])
    test_tf = v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size), *norm])
    tr_samples, classes = _scan_folder(root / "train")
    va_samples, va_classes = _scan_folder(root / "val")
    if not classes or not tr_samples:
        raise UserError(f"imagenet: no class folders with images in {root / 'train'}")
    if va_classes != classes:
        if not va_classes:
            raise UserError(f"imagenet: {root / 'val'} has no class sub-folders; "
                            "sort the validation images into val/<class>/ first")
        raise UserError(f"imagenet: val classes differ from train classes ({len(va_classes)} vs {len(classes)})")
    train = _FileList(tr_samples, classes, train_tf)
    test = _FileList(va_samples, classes, test_tf)
    return DatasetBundle("imagenet", train, test, len(classes), size, IMAGENET_MEAN, IMAGENET_STD, classes)


# ----------------------------------------------------------------------------- data order

class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch, in an order fixed by the epoch, resumable in the middle.

    ``sampler`` gives the epoch's sample order (a ``DistributedSampler``: a function of its seed
    and the epoch). ``set_epoch(epoch, start)`` selects the epoch and makes iteration begin at
    batch ``start``: the first ``start`` batches are skipped as lists of indices, so their
    samples are never loaded nor augmented. At most ``limit`` batches make an epoch.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, *, drop_last: bool = False,
                 limit: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.limit = limit
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        n = len(BatchSampler(self.sampler, self.batch_size, self.drop_last))
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self):
        batches = iter(BatchSampler(self.sampler, self.batch_size, self.drop_last))
        return itertools.islice(batches, self.start, len(self))


# ----------------------------------------------------------------------------- entry point

def canonical_dataset(name: str) -> str:
    """Normalise a dataset name (``tiny_imagenet`` -> ``tiny-imagenet``); UserError if unknown."""
    key = str(name).strip().lower().replace("_", "-")
    key = {"tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet", "cifar-10": "cifar10",
           "cifar-100": "cifar100"}.get(key, key)
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def build_datasets(name: str, data_dir: str | None = None, *, download: bool = False, seed: int = 0,
                   synthetic: dict[str, Any] | None = None, image_size: int | None = None) -> DatasetBundle:
    """Build the train and test splits of dataset ``name`` (one of :data:`DATASETS`).

    ``synthetic`` holds the options of the embedded dataset: ``num_classes``, ``image_size``,
    ``train_per_class``, ``test_per_class`` and ``seed`` (defaults to ``seed``).
    Raises :class:`UserError` with a one-line message for unknown names and bad paths.
    """
    key = canonical_dataset(name)
    if data_dir and key != "synthetic" and not Path(data_dir).exists() and not (download and key.startswith("cifar")):
        raise UserError(f"data directory not found: {data_dir}")
    if key == "synthetic":
        opts = dict(synthetic or {})
        s = int(opts.get("seed", seed))
        kw = dict(num_classes=int(opts.get("num_classes", 10)), image_size=int(opts.get("image_size", 32)))
        try:
            train = SyntheticShapes(train=True, per_class=int(opts.get("train_per_class", 500)), seed=s, **kw)
            test = SyntheticShapes(train=False, per_class=int(opts.get("test_per_class", 100)), seed=s, **kw)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        return DatasetBundle("synthetic", train, test, train.num_classes, train.image_size, SYN_MEAN, SYN_STD,
                             train.classes)
    if key in ("cifar10", "cifar100"):
        return _cifar(key, data_dir, download)
    if key == "tiny-imagenet":
        return _tiny(data_dir)
    return _imagenet(data_dir, image_size)
