"""Datasets by name (``DATASETS``), one entry each: what a config's ``data.dataset`` names.

An entry is a function ``(data_dir, root, download) -> Dataset``: the train and test splits, each either
:class:`~multiteach.data.Arrays` (uint8 NHWC images held in memory: they can live on the device) or
:class:`~multiteach.data.Files` (image paths and labels, decoded on the CPU when read: an ImageFolder), and the
class count. Each entry states at registration its classes (``num_classes=``, None when the files decide; smoke
runs on synthetic images use it), its image size (``image_size=``, None: any size, ``data.image_size``
decides), where its test split comes from (``test=``) and where validation comes from (``validation=``): for
every dataset here, ``data.val_size`` images held out of train (stratified, seeded) by the caller.

    @DATASETS.register("mydata", "my 32-px images, 7 classes", num_classes=7, image_size=32)
    def mydata(data_dir=None, root="data", download=False) -> Dataset:
        return Dataset(*load_npz_pair(data_dir), num_classes=7)

The entries (name: source; classes; image size; test split):

- ``cifar10`` / ``cifar100``: torchvision under ``root`` (downloaded only with ``download``) or
  ``DIR/{train,test}.npz``; 10 / 100 classes; 32 px; the test set.
- ``svhn``: torchvision's ``root/{train,test}_32x32.mat`` (downloaded only with ``download``; read with scipy)
  or ``DIR/{train,test}.npz``; 10 classes; 32 px; the test set.
- ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``; the class folders; any size, resized to
  ``data.image_size``; ``DIR/val``. Never downloads.
- ``npz``: ``DIR/train.npz`` and ``DIR/test.npz``; the labels' count; any H x W; ``test.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Arrays, Files, Split, _shuffled_if_sorted, load_cifar, load_npz_pair, scan_image_folder
from .registry import DATASETS

HELD_OUT = "data.val_size images held out of train (stratified by class, seeded by data.seed)"


@dataclass
class Dataset:
    """The train and test splits (:class:`Arrays` or :class:`Files`), the class count and, where known, the
    class names and the images' own size (None: files of any size; ``data.image_size`` decides)."""

    train: Split
    test: Split
    num_classes: int
    classes: tuple[str, ...] = ()
    image_size: int | None = None


@DATASETS.register("cifar10", "CIFAR-10: 50,000 train / 10,000 test images, 32 px, 10 classes", num_classes=10,
                   image_size=32, test="the test set", validation=HELD_OUT)
def cifar10(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    return Dataset(*load_cifar("cifar10", data_dir, root, download), num_classes=10, image_size=32)


@DATASETS.register("cifar100", "CIFAR-100: 50,000 train / 10,000 test images, 32 px, 100 classes",
                   num_classes=100, image_size=32, test="the test set", validation=HELD_OUT)
def cifar100(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    return Dataset(*load_cifar("cifar100", data_dir, root, download), num_classes=100, image_size=32)


SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _read_svhn_mat(path: Path) -> Arrays:
    """One SVHN split from torchvision's .mat file: X (32, 32, 3, N) uint8, y (N, 1) digits with 10 for 0."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("svhn reads its .mat files with scipy: pip install scipy") from None
    try:
        d = loadmat(str(path))
        x, y = np.asarray(d["X"]), np.asarray(d["y"]).astype(np.int64).reshape(-1)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} cannot be read as SVHN's .mat file ({type(e).__name__}: {e}): download it "
                         "again (data.download = true)") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N) and N labels, got X {x.shape}, y {y.shape}")
    y[y == 10] = 0
    return Arrays(np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8), y)


@DATASETS.register("svhn", "SVHN digits: 73,257 train / 26,032 test images, 32 px, 10 classes (torchvision's "
                   "files; 'extra' not used)", num_classes=10, image_size=32, test="the test set",
                   validation=HELD_OUT)
def svhn(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    """From ``data_dir/{train,test}.npz`` if given, else torchvision's ``root/{train,test}_32x32.mat``
    (downloaded there by torchvision only with ``download``)."""
    classes = tuple(str(i) for i in range(10))
    if data_dir is not None:
        train, test = load_npz_pair(data_dir, otherwise="drop data_dir and pass --download (download = true) "
                                                         "for torchvision's SVHN")
        return Dataset(train, test, num_classes=10, classes=classes, image_size=32)
    r = Path(root)
    if download:
        import torchvision

        for split, name in SVHN_FILES.items():
            if not (r / name).is_file():
                torchvision.datasets.SVHN(str(r), split=split, download=True)
    missing = [name for name in SVHN_FILES.values() if not (r / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"svhn not found under {str(r)!r} (no {' or '.join(missing)}): pass download = true "
            "(a config's data.download; `multiteach eval --download`), or data_dir = a folder with train.npz/test.npz"
        )
    train, test = (_shuffled_if_sorted(_read_svhn_mat(r / SVHN_FILES[s])) for s in ("train", "test"))
    return Dataset(train, test, num_classes=10, classes=classes, image_size=32)


@DATASETS.register("imagefolder", "an ImageFolder: DIR/train/<class>/* and DIR/val/<class>/* (e.g. Imagenette, "
                   "Tiny-ImageNet, ImageNet), images of any size resized to data.image_size, classes from the "
                   "folders", num_classes=None, image_size=None, test="DIR/val", validation=HELD_OUT)
def imagefolder(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    """Class names are train's folder names, sorted; labels their indices. Nothing is downloaded."""
    if data_dir is None:
        raise ValueError("dataset 'imagefolder' needs data.data_dir (eval: --data-dir), a folder laid out as "
                         "DIR/train/<class>/<image> and DIR/val/<class>/<image>")
    train, val = scan_image_folder(data_dir)
    return Dataset(train, val, num_classes=len(train.classes), classes=train.classes)


@DATASETS.register("npz", "numpy arrays: DIR/train.npz and DIR/test.npz (x uint8 N,H,W,3 of any size; y integer "
                   "labels, the class count from them)", num_classes=None, image_size=None, test="DIR/test.npz",
                   validation=HELD_OUT)
def npz(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    if data_dir is None:
        raise ValueError("dataset 'npz' needs data.data_dir (eval: --data-dir), a folder with train.npz and "
                         "test.npz (x uint8 N,H,W,3; y integer labels)")
    train, test = load_npz_pair(data_dir, shape="N,H,W,3", otherwise="set data.dataset to a torchvision dataset")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"{data_dir}: train.npz holds {train.x.shape[1]}x{train.x.shape[2]} images, test.npz "
                         f"{test.x.shape[1]}x{test.x.shape[2]}: write both splits at one size")
    return Dataset(train, test, num_classes=int(max(train.y.max(), test.y.max())) + 1,
                   image_size=train.x.shape[1] if train.x.shape[1] == train.x.shape[2] else None)


def load_dataset(name: str, data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    """The registered dataset ``name`` (one-line error listing the choices for an unknown one)."""
    return DATASETS.get_entry(name).fn(data_dir=data_dir, root=root, download=download)


__all__ = ["DATASETS", "Dataset", "Files", "cifar10", "cifar100", "imagefolder", "load_dataset", "npz", "svhn"]
