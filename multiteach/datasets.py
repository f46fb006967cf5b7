"""Datasets by name (``DATASETS``), one entry each: what a config's ``data.dataset`` names.

An entry is a function ``(data_dir, root, download) -> Dataset``: the train and test splits as uint8 NHWC
arrays and the class count (also declared at registration, ``num_classes=``, for smoke runs on synthetic
images that stand in for the dataset). Validation for model selection is held out of train by the caller
(``data.val_size``), the same for every dataset.

    @DATASETS.register("mydata", "my 32-px images, 7 classes", num_classes=7)
    def mydata(data_dir=None, root="data", download=False) -> Dataset:
        return Dataset(*load_npz_pair(data_dir), num_classes=7)
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import Arrays, load_cifar
from .registry import DATASETS


@dataclass
class Dataset:
    train: Arrays
    test: Arrays
    num_classes: int


@DATASETS.register("cifar10", "CIFAR-10: 50,000 train / 10,000 test images, 32 px, 10 classes", num_classes=10)
def cifar10(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    return Dataset(*load_cifar("cifar10", data_dir, root, download), num_classes=10)


@DATASETS.register("cifar100", "CIFAR-100: 50,000 train / 10,000 test images, 32 px, 100 classes",
                   num_classes=100)
def cifar100(data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    return Dataset(*load_cifar("cifar100", data_dir, root, download), num_classes=100)


def load_dataset(name: str, data_dir: str | None = None, root: str = "data", download: bool = False) -> Dataset:
    """The registered dataset ``name`` (one-line error listing the choices for an unknown one)."""
    return DATASETS.get_entry(name).fn(data_dir=data_dir, root=root, download=download)


__all__ = ["DATASETS", "Dataset", "cifar10", "cifar100", "load_dataset"]
