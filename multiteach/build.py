"""From a validated :class:`~multiteach.ExperimentConfig` to data, recipe and trainer (CLI and examples)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, ValidationError, validate_call
from rich.console import Console

from .config import DataConfig, ExperimentConfig, ModelConfig
from .data import Arrays, Files, Images, Split, resize_arrays, split_validation, synthetic
from .datasets import load_dataset
from .distributed import DistContext
from .loaders import decode, eval_crop, make_loader, resolve_augment
from .presets import get_preset
from .recipe import Recipe
from .registry import DATASETS
from .runtime import resolve_device, seed_everything
from .teachers import Teacher
from .trainer import Trainer

DEFAULT_FILE_IMAGE_SIZE = 224  # image files (imagefolder) without data.image_size: the ImageNet convention


@dataclass
class Splits:
    """Train / validation / test splits (:class:`Arrays`, or :class:`Files` read when needed), the class count,
    the resolution (None: arrays at their own size) and the training augmentation (it decides the evaluation
    crop of image files: see :func:`multiteach.loaders.eval_crop`)."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    image_size: int | None = None
    augment: str = "crop_flip"
    classes: tuple[str, ...] = ()


def load_splits(cfg: DataConfig, synthetic_data: bool = False) -> Splits:
    """Train / validation / test splits as the config says (``synthetic_data``: toy images for smoke runs).

    Validation is ``cfg.val_size`` images held out of train. ``cfg.image_size`` (default: the dataset's own, 224
    for image files) is the resolution: arrays of another size are resized here, once; files when read."""
    entry = DATASETS.get_entry(cfg.dataset)
    classes: tuple[str, ...] = ()
    if synthetic_data:  # toy images in the dataset's class count (labels 0-9), for smoke runs
        n_classes = entry.meta.get("num_classes") or 10
        size = cfg.image_size or entry.meta.get("image_size") or 32
        train = synthetic(max(cfg.train_size or 2048, cfg.val_size + 64), size=size)
        test = synthetic(512, size=size, seed=1)
        native: int | None = size
    else:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.root, cfg.download)
        train, test, n_classes, classes, native = ds.train, ds.test, ds.num_classes, ds.classes, ds.image_size
    for split, a in (("train", train), ("test", test)):
        if len(a) == 0:
            raise ValueError(f"the {split} split holds no images")
        if int(a.y.max()) >= n_classes:
            raise ValueError(f"{split} labels go up to {int(a.y.max())} but {cfg.dataset} has {n_classes} classes: "
                             "set data.dataset to match the files")
    train, val = split_validation(train, cfg.val_size, cfg.seed)
    if cfg.train_size is not None:
        train = train.take(np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.train_size])
    if cfg.test_size is not None:
        test = test.take(np.arange(min(cfg.test_size, len(test))))
    size = cfg.image_size or native or (DEFAULT_FILE_IMAGE_SIZE if isinstance(train, Files) else None)
    if size is not None:
        train, val, test = (resize_arrays(a, size) if isinstance(a, Arrays) else a for a in (train, val, test))
    return Splits(train, val, test, n_classes, size, resolve_augment(cfg.augment, size or _array_size(train)),
                  classes)


def _array_size(a: Split) -> int | None:
    return int(min(a.x.shape[1:3])) if isinstance(a, Arrays) else None


def build_model(cfg: ModelConfig, num_classes: int, name: str = "student", image_size: int | None = None,
                teacher: bool = False) -> torch.nn.Module:
    """The network a model table names (timm, torchvision or RobustBench; pretrained weights behind their
    normalisation), with its checkpoint; one whose input size differs from ``image_size`` is refused now
    unless it resizes."""
    from .pretrained import from_config

    net = from_config(cfg, num_classes, name, teacher=teacher)
    if image_size is not None and getattr(net, "preprocess", None) is not None:
        net.preprocess.check(image_size)
    return net


def build_recipe(cfg: ExperimentConfig, num_classes: int, image_size: int | None = None) -> Recipe:
    """The preset named in the config, its options validated against the preset's signature; ``image_size``
    (the data's, when known) refuses a model of another input size before any step."""
    info = get_preset(cfg.preset)
    student = build_model(cfg.student, num_classes, "student", image_size)
    teachers = {f"{role}_teacher": Teacher(build_model(t, num_classes, f"teacher {role!r}", image_size, teacher=True),
                                           name=role)
                for role, t in cfg.teachers.items()}
    fn = validate_call(info.fn, config=ConfigDict(arbitrary_types_allowed=True))
    try:
        return fn(student, **teachers, num_classes=num_classes, **cfg.options)
    except ValidationError as e:
        bad = "; ".join(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"preset {cfg.preset!r}: {bad} (its options: {', '.join(info.options())})") from None


DATA_INIT_IMAGES = 5000  # airbench fits its whitening stem to 5,000 training images


def init_from_data(model: torch.nn.Module, splits: Splits, n: int = DATA_INIT_IMAGES,
                   workers: int | None = None) -> bool:
    """A network's data-dependent initialization (its ``init_from_data(images)``, e.g. airbench's whitening
    stem) from ``n`` training images drawn at random (seed 0; image files may be sorted by class), unaugmented,
    as uint8 :class:`~multiteach.data.Images`; False where it has none. A resumed run's checkpoint then
    overwrites what it set."""
    fit = getattr(model, "init_from_data", None)
    if fit is None:
        return False
    pick = np.sort(np.random.default_rng(0).permutation(len(splits.train))[:n])
    fit(_images(splits.train.take(pick), splits, workers))
    return True


def _images(split: Split, splits: Splits, workers: int | None) -> Images:
    """A split's images as uint8 :class:`~multiteach.data.Images`; image files decoded once by ``workers``
    processes at ``splits.image_size``, centre-cropped as after ``splits.augment`` training."""
    if isinstance(split, Files):
        split = decode(split, int(splits.image_size or DEFAULT_FILE_IMAGE_SIZE), eval_crop(splits.augment), workers)
    return Images(split.x)


def build_trainer(cfg: ExperimentConfig, *, dist: DistContext | None = None, console: Console | None = None,
                  synthetic_data: bool = False, splits: Splits | None = None) -> Trainer:
    dist = dist or DistContext()
    device = resolve_device(dist.device(cfg.train.device))
    seed_everything(cfg.train.seed + dist.rank)
    splits = splits or load_splits(cfg.data, synthetic_data)
    recipe = build_recipe(cfg, splits.num_classes, image_size=splits.image_size)  # a size mismatch: refused now
    if cfg.student.checkpoint is None:  # a given student keeps its own; before the trainer's EMA copy
        init_from_data(recipe.student, splits, workers=cfg.data.workers)
    log = console.log if console is not None and dist.is_main else None
    common = dict(kind=cfg.data.loader, augment=splits.augment, image_size=splits.image_size, device=device,
                  rank=dist.rank, world=dist.world, workers=cfg.data.workers, log=log)
    train_loader = make_loader(splits.train, cfg.train.batch_size, train=True, seed=cfg.train.seed, name="train split",
                               **common)
    val_loader = None
    if len(splits.val):
        val_loader = make_loader(splits.val, cfg.eval.batch_size, train=False, name="validation split", **common)
    train_cfg = cfg.train.model_copy(update={"device": str(device)})
    experiment: dict[str, Any] = {"digest": cfg.digest(), "config": cfg.model_dump(mode="json")}
    return Trainer(recipe, train_loader, train_cfg, val_loader=val_loader, run_dir=cfg.run_dir,
                   experiment=experiment, dist=dist, console=console)


def eval_tensors(splits: Splits, n: int | None = None, workers: int | None = None) -> tuple[Images, torch.Tensor]:
    """The first ``n`` test images (as :class:`~multiteach.data.Images`: uint8 in memory, float NCHW in [0, 1]
    a batch at a time) and their labels; image files are decoded once by ``workers`` processes at
    ``splits.image_size``, centre-cropped as after ``splits.augment`` training."""
    test = splits.test if n is None else splits.test.take(np.arange(min(n, len(splits.test))))
    return _images(test, splits, workers), torch.from_numpy(test.y)


__all__ = ["DATA_INIT_IMAGES", "DEFAULT_FILE_IMAGE_SIZE", "Splits", "build_model", "build_recipe", "build_trainer",
           "eval_tensors", "init_from_data", "load_splits"]
