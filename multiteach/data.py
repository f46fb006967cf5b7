"""CIFAR data: torchvision's download or the decoded numpy files, held on the training device.

The whole split lives on the device as uint8; each batch is cropped (pad 4) and flipped there in one
batched op, so no per-image Python runs in the loop (airbench's idea). Inputs are in [0, 1] with no
normalization (as in the papers); a model that wants normalization should carry it as its first layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class Arrays:
    """One split as uint8 NHWC images and int64 labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Arrays:
        return Arrays(self.x[idx], self.y[idx])


def _read_npz(path: Path) -> Arrays:
    """One split from ``path``, checked: uint8 images (N, H, W, 3) and N integer labels >= 0."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d or "y" not in d:
                raise ValueError(f"{path} must hold arrays 'x' (uint8 N,32,32,3) and 'y' (labels)")
            x, y = d["x"], d["y"]
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a .npz file ({e}): is it truncated? decode it again") from None
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ValueError(f"{path} holds object arrays (pickled data), which are not read: save x as uint8 "
                             "and y as integers") from None
        raise
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{path}: expected x uint8 (N,H,W,3), got x {x.dtype} {x.shape}")
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{path}: expected y of shape ({len(x)},) (one label per image), got {y.shape}")
    if len(y) == 0:
        raise ValueError(f"{path} holds no images")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got {y.dtype} (float labels would be truncated)")
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, got {int(y.min())}")
    return Arrays(x, y.astype(np.int64))


def _shuffled_if_sorted(a: Arrays) -> Arrays:
    """Files grouped by class get a fixed random order (seed 0), so a first-n subset is representative."""
    if len(a) > 1 and np.all(np.diff(a.y) >= 0):
        return a.take(np.random.default_rng(0).permutation(len(a)))
    return a


def load_npz_pair(data_dir: str | os.PathLike) -> tuple[Arrays, Arrays]:
    """(train, test) from ``data_dir/train.npz`` and ``data_dir/test.npz`` (x uint8 NHWC, y integer labels)."""
    d = Path(data_dir)
    missing = [s for s in ("train.npz", "test.npz") if not (d / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data directory {str(d)!r} has no {' or '.join(missing)}: write them there (x uint8 N,32,32,3; "
            "y integer labels; e.g. with numpy.savez), or drop data_dir and pass --download (download = "
            "true) for torchvision's CIFAR"
        )
    return _shuffled_if_sorted(_read_npz(d / "train.npz")), _shuffled_if_sorted(_read_npz(d / "test.npz"))


def load_cifar(dataset: str = "cifar10", data_dir: str | os.PathLike | None = None,
               root: str | os.PathLike = "data", download: bool = False) -> tuple[Arrays, Arrays]:
    """(train, test) arrays, from ``data_dir/{train,test}.npz`` if given, else torchvision under ``root``."""
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(NUM_CLASSES)}")
    if data_dir is not None:
        return load_npz_pair(data_dir)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        splits = [cls(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{dataset} not found under {str(root)!r} ({e}): pass download=True (--set data.download=true) "
            "or data_dir= a folder with train.npz/test.npz"
        ) from None
    return tuple(Arrays(np.asarray(s.data, dtype=np.uint8), np.asarray(s.targets, dtype=np.int64))
                 for s in splits)  # type: ignore[return-value]


def split_validation(train: Arrays, val_size: int, seed: int = 0) -> tuple[Arrays, Arrays]:
    """Hold out ``val_size`` training images (stratified by class, seeded) for model selection."""
    if val_size <= 0:
        return train, Arrays(train.x[:0], train.y[:0])
    if val_size >= len(train):
        raise ValueError(f"val_size {val_size} leaves no training images (the split has {len(train)})")
    rng = np.random.default_rng(seed)
    classes = np.unique(train.y)
    per_class = [rng.permutation(np.flatnonzero(train.y == c)) for c in classes]
    quota = np.full(len(classes), val_size // len(classes))
    quota[: val_size - quota.sum()] += 1
    val_idx = np.concatenate([idx[:q] for idx, q in zip(per_class, quota)])
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    return train.take(np.flatnonzero(mask)), train.take(np.sort(val_idx))


def synthetic(n: int = 512, num_classes: int = 10, size: int = 32, seed: int = 0) -> Arrays:
    """Learnable toy images for tests: each class a colour and a stripe pattern (the same for every seed),
    plus noise drawn from ``seed``."""
    colours = np.random.default_rng(12345).uniform(40, 215, (num_classes, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    grid = np.arange(size)
    stripes = np.stack([np.sin(grid[:, None] * (1 + c % 3) * 0.5 + grid[None, :] * (c // 3) * 0.5)
                        for c in range(num_classes)])
    x = colours[y][:, None, None, :] + 30 * stripes[y][..., None] + rng.normal(0, 20, (n, size, size, 3))
    return Arrays(np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64))


def crop_flip(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, batched (N, C, H, W)."""
    n, c, h, w = x.shape
    dev = x.device
    shift = torch.randint(0, 2 * pad + 1, (2, n), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (shift[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (shift[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
               rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class TensorLoader:
    """Batches of one split held on ``device``: shuffled, augmented and sharded across ranks on the device.

    With ``world > 1`` every rank draws the same global permutation and augmentation and keeps its own
    contiguous share of each global batch, so N ranks see exactly the images one process would.
    ``state_dict`` captures the position inside an epoch, so an interrupted run resumes mid-epoch.
    """

    def __init__(self, data: Arrays, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                 world: int = 1, pad: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = torch.from_numpy(np.ascontiguousarray(data.x)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.y = torch.from_numpy(np.asarray(data.y, dtype=np.int64)).to(self.device)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.rank, self.world, self.pad = rank, world, pad
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._perm: Tensor | None = None
        self._pos = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _new_perm(self) -> Tensor:
        n = len(self.y)
        if self.shuffle:
            return torch.randperm(n, device=self.device, generator=self.generator)
        return torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._perm is None:
            self._perm, self._pos = self._new_perm(), 0
        while self._pos < len(self):
            g = self.global_batch
            idx = self._perm[self._pos * g:(self._pos + 1) * g]
            x = self.x[idx]
            if self.augment:
                x = crop_flip(x, self.pad, self.generator)
            lo = min(self.rank * self.batch_size, len(idx))
            hi = min(lo + self.batch_size, len(idx))
            self._pos += 1
            yield x[lo:hi].float().div_(255), self.y[idx[lo:hi]]
        self._perm = None

    @property
    def position(self) -> int:
        """Batches already served in the current epoch (0 between epochs)."""
        return self._pos if self._perm is not None else 0

    def end_epoch(self) -> None:
        """Forget the current epoch's order: the next iteration starts a new epoch."""
        self._perm, self._pos = None, 0

    def state_dict(self) -> dict:
        return {"perm": None if self._perm is None else self._perm.cpu(), "pos": self._pos,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` was taken. A mid-epoch state holds the epoch's order over the split it was
        written with: a split of another size (``data.train_size`` changed under ``--force``) cannot continue
        it and is refused with :class:`~multiteach.checkpoint.CheckpointError`. Between epochs only the
        generator is kept, and the next epoch draws its order over the split as it is now."""
        perm, pos = state["perm"], int(state["pos"])
        if perm is not None and len(perm) != len(self.y):
            from .checkpoint import CheckpointError

            raise CheckpointError(
                f"the checkpoint (last.pt) was written in the middle of an epoch over {len(perm)} training images; "
                f"this run has {len(self.y)}: the rest of that epoch cannot be replayed. Resume with the original "
                "data settings (data.train_size, data.val_size), or start afresh with --restart or another run_dir"
            )
        if perm is not None and not 0 <= pos <= len(self):
            from .checkpoint import CheckpointError

            raise CheckpointError(
                f"the checkpoint (last.pt) was written after batch {pos} of an epoch that now has {len(self)} "
                "batches (was train.batch_size changed?): resume with the original batch size, or start afresh "
                "with --restart or another run_dir"
            )
        self._perm = None if perm is None else perm.to(self.device)
        self._pos = pos
        self.generator.set_state(state["generator"])


__all__ = ["NUM_CLASSES", "Arrays", "TensorLoader", "crop_flip", "load_cifar", "split_validation", "synthetic"]
