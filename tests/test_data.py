"""Tests of the trainer's datasets: synthetic, and CIFAR / Tiny-ImageNet / ImageFolder read from tiny
files written here in each dataset's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from icakd_fast.train import UserError, build_datasets
from icakd_fast.train.__main__ import main
from icakd_fast.train.synthetic import SyntheticShapes, class_attributes

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("torchvision")


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_balanced():
    a = SyntheticShapes(train=True, num_classes=6, image_size=16, per_class=5, seed=7)
    b = SyntheticShapes(train=True, num_classes=6, image_size=16, per_class=5, seed=7)
    c = SyntheticShapes(train=True, num_classes=6, image_size=16, per_class=5, seed=8)
    t = SyntheticShapes(train=False, num_classes=6, image_size=16, per_class=5, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, t.images)  # train and test are different draws
    assert a.images.shape == (30, 3, 16, 16) and a.images.dtype == torch.uint8
    assert torch.bincount(a.targets, minlength=6).tolist() == [5] * 6
    x, y = a[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    x0, _ = t[0]
    assert torch.equal(x0, t[0][0])  # test split: no augmentation


def test_synthetic_classes_share_attributes():
    attrs = class_attributes(12, seed=0)
    assert len(set(attrs)) == 12
    # several classes share each of shape / colour / texture (non-trivial category structure)
    for k in range(3):
        values = [a[k] for a in attrs]
        assert len(set(values)) < len(values)
    with pytest.raises(ValueError):
        class_attributes(1000)


def test_synthetic_object_is_localised():
    """The class object occupies a minority of the image: evidence is spatially localised."""
    ds = SyntheticShapes(train=False, num_classes=4, image_size=32, per_class=3, seed=0)
    assert ds.classes and all(len(n.split()) == 3 for n in ds.classes)
    var = ds.images.float().std(dim=(0,))  # positions vary across images
    assert var.mean() > 10


def test_synthetic_bundle_options():
    b = build_datasets("synthetic", synthetic={"num_classes": 3, "image_size": 12, "train_per_class": 4,
                                                "test_per_class": 2})
    assert (b.num_classes, b.image_size, len(b.train), len(b.test)) == (3, 12, 12, 6)
    with pytest.raises(UserError):
        build_datasets("synthetic", synthetic={"num_classes": 1})


# ----------------------------------------------------------------------------- CIFAR

def _write_cifar(root: Path, which: str, n_per_file: int = 6) -> Path:
    rng = np.random.default_rng(0)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
        meta_name, meta = "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        files, key, classes = ["train", "test"], b"fine_labels", 100
        meta_name, meta = "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}
    folder.mkdir(parents=True)
    for name in files:
        entry = {b"data": rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8),
                 key: [int(v) for v in rng.integers(0, classes, size=n_per_file)],
                 b"batch_label": name.encode()}
        if which == "cifar100":
            entry[b"coarse_labels"] = [0] * n_per_file
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return folder


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_loader_reads_python_batches(tmp_path, which):
    folder = _write_cifar(tmp_path, which)
    b = build_datasets(which, str(tmp_path))
    n_train = 30 if which == "cifar10" else 6
    assert (len(b.train), len(b.test), b.image_size) == (n_train, 6, 32)
    assert b.num_classes == (10 if which == "cifar10" else 100)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < b.num_classes
    # the test transform is deterministic and matches the stored pixels after normalisation
    raw = pickle.load(open(folder / ("test_batch" if which == "cifar10" else "test"), "rb"), encoding="bytes")
    img = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(b.mean).view(3, 1, 1)
    std = torch.tensor(b.std).view(3, 1, 1)
    assert torch.allclose(b.test[0][0], (img - mean) / std, atol=1e-5)
    assert b.classes[0] in ("c0", "f0")
    # the folder itself works as --data-dir too
    assert len(build_datasets(which, str(folder)).test) == 6


def test_cifar_missing_suggests_download(tmp_path):
    with pytest.raises(UserError, match="add --download"):
        build_datasets("cifar10", str(tmp_path))


def test_cifar_corrupt_file_is_a_clear_error(tmp_path):
    folder = _write_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a CIFAR python-format batch"):
        build_datasets("cifar10", str(tmp_path))


def test_cifar_through_the_cli(tmp_path):
    _write_cifar(tmp_path / "data", "cifar10", n_per_file=8)
    rc = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--method", "ce", "--student",
               "resnet8", "--epochs", "1", "--batch-size", "8", "--limit-train-batches", "2", "--workers", "0",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0 and (tmp_path / "out" / "last.pt").is_file()


# ----------------------------------------------------------------------------- Tiny-ImageNet

def _jpeg(path: Path, size: int, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.new("RGB", (size, size), colour).save(path, format="JPEG")


def _write_tiny(root: Path, wnids=("n02", "n01", "n03"), per_class: int = 2) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {w}" for w in wnids) + "\n")
    for k, w in enumerate(wnids):
        boxes = []
        for i in range(per_class):
            name = f"{w}_{i}.JPEG"
            _jpeg(base / "train" / w / "images" / name, 64, (40 * k, 80, 120))
            boxes.append(f"{name}\t0\t0\t63\t63")
        (base / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    ann = []
    for i, w in enumerate(list(wnids) * 2):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", 64, (10, 20, 30))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    _jpeg(base / "test" / "images" / "test_0.JPEG", 64, (0, 0, 0))
    return base


def test_tiny_imagenet_layout(tmp_path):
    base = _write_tiny(tmp_path)
    for data_dir in (tmp_path, base):
        b = build_datasets("tiny-imagenet", str(data_dir))
        assert b.num_classes == 3 and b.classes == ["n01", "n02", "n03"]
        assert len(b.train) == 6 and len(b.test) == 6
        x, y = b.train[0]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        # val labels come from val_annotations.txt (val_0 -> n02, val_1 -> n01, ...)
        assert [y for _, y in b.test.samples] == [1, 0, 2, 1, 0, 2]
        assert b.test[0][0].shape == (3, 64, 64)


def test_tiny_imagenet_bad_annotation(tmp_path):
    base = _write_tiny(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="val_annotations.txt:1"):
        build_datasets("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_through_the_cli(tmp_path):
    _write_tiny(tmp_path / "data")
    rc = main(["--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "data"), "--method", "ce",
               "--student", "resnet8", "--epochs", "1", "--batch-size", "3", "--workers", "0",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0


# ----------------------------------------------------------------------------- ImageNet (ImageFolder)

def _write_imagefolder(root: Path, classes=("n01440764", "n01443537"), per_class: int = 3) -> None:
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            for i in range(per_class):
                ext = "JPEG" if i % 2 == 0 else "png"
                img = PIL.new("RGB", (40 + 7 * i, 36), (60 * k, 100, 30 * i))
                p = root / split / c / f"{c}_{i}.{ext}"
                p.parent.mkdir(parents=True, exist_ok=True)
                img.save(p)


def test_imagefolder_loader(tmp_path):
    _write_imagefolder(tmp_path)
    (tmp_path / "train" / "n01440764" / "notes.txt").write_text("not an image")
    b = build_datasets("imagenet", str(tmp_path), image_size=32)
    assert b.num_classes == 2 and len(b.train) == 6 and len(b.test) == 6
    x, y = b.train[5]
    assert x.shape == (3, 32, 32) and y == 1
    assert b.test[0][0].shape == (3, 32, 32)


def test_imagefolder_flat_val_is_a_clear_error(tmp_path):
    _write_imagefolder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "val")
    _jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 32, (1, 2, 3))
    with pytest.raises(UserError, match="no class sub-folders"):
        build_datasets("imagenet", str(tmp_path))


def test_imagefolder_through_the_cli(tmp_path):
    _write_imagefolder(tmp_path / "data")
    rc = main(["--dataset", "imagenet", "--data-dir", str(tmp_path / "data"), "--image-size", "32",
               "--method", "ce", "--student", "resnet18", "--epochs", "1", "--batch-size", "3", "--workers", "0",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
