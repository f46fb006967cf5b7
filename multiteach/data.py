"""Splits and the device-resident loader.

A split is either :class:`Arrays` (uint8 NHWC images and labels: CIFAR, SVHN, npz files) or :class:`Files`
(image paths and labels: an ImageFolder, decoded on the CPU when read). :class:`TensorLoader` holds a whole
split on the device as uint8; each batch is cropped (pad 4) and flipped there in one batched op, so no
per-image Python runs in the loop (airbench's idea). :mod:`multiteach.loaders` streams the splits that do not
fit. Inputs are in [0, 1] with no normalization (as in the papers); a model that wants normalization should
carry it as its first layer.
"""

from __future__ import annotations

import math
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


class Images:
    """Evaluation images held as uint8 NHWC, handed out as float NCHW in [0, 1] one slice at a time:
    ``images[a:b]`` is a view, ``images[a:b].to(device)`` the float batch on that device (converted there, so a
    quarter of the bytes cross to a GPU). The evaluation moves a batch at a time, so a test split is never held
    whole as floats: 4x its uint8 size, 30 GB for ImageNet's 50,000 validation images at 224."""

    dtype = torch.float32

    def __init__(self, x: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"Images holds uint8 NHWC RGB arrays, got {x.dtype} of shape {x.shape}")
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> torch.Size:
        n, h, w, c = self.x.shape
        return torch.Size((n, c, h, w))

    def __getitem__(self, index: slice) -> Images:
        if not isinstance(index, slice):
            raise TypeError(f"Images are sliced (images[a:b]), not indexed by {type(index).__name__}")
        return Images(self.x[index])

    def to(self, device: torch.device | str | None = None, **kwargs: object) -> Tensor:
        """The images as a float NCHW tensor in [0, 1] on ``device``."""
        x = torch.from_numpy(np.ascontiguousarray(self.x)).to(device, **kwargs)
        return x.permute(0, 3, 1, 2).float().div_(255)

    def float(self) -> Tensor:
        return self.to("cpu")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Files:
    """One split as image files (any size, decoded when read) and int64 labels: ``root / paths[i]``.

    Paths are held as a numpy array of bytes (``os.fsencode``), not a list of str, so the loader's forked workers share
    them without copying (a list's reference counts would touch every page)."""

    root: str
    paths: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Files:
        return Files(self.root, self.paths[idx], self.y[idx], self.classes)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))


Split = Arrays | Files


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (any depth, hidden entries skipped), as sorted paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (torchvision's ImageFolder layout)"


def scan_image_folder(data_dir: str | os.PathLike) -> tuple[Files, Files]:
    """(train, val) of an ImageFolder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``, classes sorted by name
    (labels from train's folders), each split in a fixed shuffled order (seed 0). A missing folder, a split
    without class folders, an empty class folder or a val class that train lacks is a one-line error naming
    the folder and the expected layout."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"imagefolder: {str(d)!r} does not exist: expected {LAYOUT}")
    splits = []
    classes: list[str] = []
    for split in ("train", "val"):
        folder = d / split
        if not folder.is_dir():
            found = ", ".join(sorted(p.name for p in d.iterdir() if p.is_dir())[:5]) or "no folders"
            raise FileNotFoundError(f"imagefolder: {str(folder)!r} not found (in {str(d)!r}: {found}): expected "
                                    f"{LAYOUT}")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            loose = len(_image_files(folder))
            raise ValueError(f"imagefolder: {str(folder)!r} has no class folders"
                             + (f" ({loose} images lie directly in it)" if loose else "")
                             + f": expected {LAYOUT}, one folder per class")
        if split == "train":
            classes = names
        else:
            extra = [c for c in names if c not in classes]
            if extra:
                raise ValueError(f"imagefolder: {str(folder)!r} has class folder(s) {', '.join(extra[:5])} that "
                                 f"{str(d / 'train')!r} lacks: val's classes must be among train's {len(classes)}")
        paths, labels = [], []
        for name in names:
            files = _image_files(folder / name)
            if not files:
                raise ValueError(f"imagefolder: {str(folder / name)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}"
                                 f"): expected {LAYOUT}; remove the empty folder")
            paths += [os.path.join(name, f) for f in files]
            labels += [classes.index(name)] * len(files)
        split_files = Files(str(folder), np.array([os.fsencode(p) for p in paths]), np.array(labels, dtype=np.int64),
                            tuple(classes))
        splits.append(split_files.take(np.random.default_rng(0).permutation(len(split_files))))
    return splits[0], splits[1]


def _read_npz(path: Path) -> Arrays:
    """One split from ``path``, checked: uint8 images (N, H, W, 3) and N integer labels >= 0."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d or "y" not in d:
                raise ValueError(f"{path} must hold arrays 'x' (uint8 N,H,W,3) and 'y' (labels)")
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


def _shuffled_if_sorted(a: Split) -> Split:
    """Files grouped by class (each class one block, in any order) get a fixed random order (seed 0), so a
    first-n subset is representative."""
    if len(a) > 1 and np.count_nonzero(np.diff(a.y)) == len(np.unique(a.y)) - 1:
        return a.take(np.random.default_rng(0).permutation(len(a)))
    return a


def load_npz_pair(data_dir: str | os.PathLike, shape: str = "N,32,32,3",
                  otherwise: str = "drop data_dir and pass --download (download = true) for torchvision's CIFAR"
                  ) -> tuple[Arrays, Arrays]:
    """(train, test) from ``data_dir/train.npz`` and ``data_dir/test.npz`` (x uint8 NHWC, y integer labels);
    ``shape`` and ``otherwise`` word the error for missing files."""
    d = Path(data_dir)
    missing = [s for s in ("train.npz", "test.npz") if not (d / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data directory {str(d)!r} has no {' or '.join(missing)}: write them there (x uint8 {shape}; "
            f"y integer labels; e.g. with numpy.savez), or {otherwise}"
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
            f"{dataset} not found under {str(root)!r} ({e}): pass download = true "
            "(a config's data.download; `multiteach eval --download`), or data_dir = a folder with train.npz/test.npz"
        ) from None
    return tuple(Arrays(np.asarray(s.data, dtype=np.uint8), np.asarray(s.targets, dtype=np.int64))
                 for s in splits)  # type: ignore[return-value]


def _class_quota(counts: np.ndarray, val_size: int) -> np.ndarray:
    """Validation images per class: in proportion to the class sizes (largest remainders first, ties to the
    lower class), every class keeping at least one training image; a balanced set gets equal shares."""
    cap = counts - 1
    if val_size > cap.sum():
        raise ValueError(f"val_size {val_size} would leave a class without training images (the split has "
                         f"{int(counts.sum())} images in {len(counts)} classes): use a smaller val_size")
    exact = val_size * counts / counts.sum()
    quota = np.minimum(np.floor(exact).astype(np.int64), cap)
    order = np.argsort(-(exact - quota), kind="stable")
    while quota.sum() < val_size:  # the remainders, then whatever a capped class could not hold
        for c in order:
            if quota.sum() < val_size and quota[c] < cap[c]:
                quota[c] += 1
    return quota


def split_validation(train: Split, val_size: int, seed: int = 0) -> tuple[Split, Split]:
    """Hold out ``val_size`` training images (stratified by class in proportion to the class sizes, seeded)
    for model selection; every class keeps training images."""
    if val_size <= 0:
        return train, train.take(np.arange(0))
    if val_size >= len(train):
        raise ValueError(f"val_size {val_size} leaves no training images (the split has {len(train)})")
    rng = np.random.default_rng(seed)
    classes = np.unique(train.y)
    per_class = [rng.permutation(np.flatnonzero(train.y == c)) for c in classes]
    quota = _class_quota(np.array([len(i) for i in per_class]), val_size)
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


def resized_crop_flip(x: Tensor, generator: torch.Generator | None = None, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``, as torchvision's
    RandomResizedCrop) back to the input's size, and random horizontal flip, batched (N, C, H, W) float.

    One bilinear ``grid_sample`` for the whole batch; a crop wider or taller than the image is clamped to it
    (torchvision retries 10 times and then takes a centre crop instead)."""
    n, _, h, w = x.shape
    dev = x.device
    u = torch.rand(5, n, device=dev, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    fw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # crop width / image width
    fh = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    cx = (u[2] * 2 - 1) * (1 - fw)  # centre in [-1 + fw, 1 - fw] (normalised coordinates)
    cy = (u[3] * 2 - 1) * (1 - fh)
    flip = torch.where(u[4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = fw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_arrays(a: Arrays, size: int, chunk: int = 2048) -> Arrays:
    """Every image resized (shorter side to ``size``, antialiased bilinear) and centre-cropped to size x size."""
    from torchvision.transforms.v2 import functional as TF

    if a.x.shape[1:3] == (size, size):
        return a
    out = np.empty((len(a), size, size, 3), dtype=np.uint8)
    for i in range(0, len(a), chunk):
        t = torch.from_numpy(np.ascontiguousarray(a.x[i:i + chunk])).permute(0, 3, 1, 2)
        t = TF.center_crop(TF.resize(t, [size], antialias=True), [size, size])
        out[i:i + chunk] = t.permute(0, 2, 3, 1).numpy()
    return Arrays(out, a.y)


AUGMENTS = ("none", "crop_flip", "resized_crop")


def augment_mode(augment: bool | str | None) -> str:
    """``True`` -> "crop_flip" (pad-crop + flip, 32-px data), ``False``/None -> "none", or a mode by name."""
    if augment is True:
        return "crop_flip"
    if augment is False or augment is None:
        return "none"
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}: use one of {', '.join(AUGMENTS)}")
    return augment


def augment_seed(seed: int) -> int:
    """The augmentation's seed: apart from the order's (``seed``), so the batch order never depends on it."""
    return seed + 2**32


def check_resume_state(state: dict, n_images: int, n_batches: int, global_batch: int | None = None) -> None:
    """Refuse a mid-epoch loader state that this split cannot continue (either loader's ``load_state_dict``)."""
    perm, pos = state["perm"], int(state["pos"])
    written = state.get("global_batch")  # absent in states written before it was recorded
    if perm is not None and written is not None and global_batch is not None and int(written) != global_batch:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"the checkpoint (last.pt) was written in the middle of an epoch with global batches of {int(written)} "
            f"images (batch size x processes); this run's are {global_batch}: the rest of that epoch would skip or "
            "repeat images. Resume with the original batch size and number of processes (it may change at an "
            "epoch's end), or start afresh with --restart or another run_dir"
        )
    if perm is not None and len(perm) != n_images:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"the checkpoint (last.pt) was written in the middle of an epoch over {len(perm)} training images; "
            f"this run has {n_images}: the rest of that epoch cannot be replayed. Resume with the original "
            "data settings (data.train_size, data.val_size), or start afresh with --restart or another run_dir"
        )
    if perm is not None and not 0 <= pos <= n_batches:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"the checkpoint (last.pt) was written after batch {pos} of an epoch that now has {n_batches} "
            "batches (was train.batch_size changed?): resume with the original batch size, or start afresh "
            "with --restart or another run_dir"
        )


class EpochCursor:
    """Where a loader is in its epoch: the epoch's order (``_perm``, None between epochs) and the batches
    served (``_pos``); shared by the resident and the streaming loader."""

    _perm: object = None
    _pos: int = 0

    @property
    def position(self) -> int:
        """Batches already served in the current epoch (0 between epochs)."""
        return self._pos if self._perm is not None else 0

    def end_epoch(self) -> None:
        """Forget the current epoch's order: the next iteration starts a new epoch."""
        self._perm, self._pos = None, 0


class TensorLoader(EpochCursor):
    """Batches of one split held on ``device``: shuffled, augmented and sharded across ranks on the device.

    The order of each epoch is a permutation drawn on the CPU from ``seed`` (the same on every device, and the
    same as :class:`~multiteach.loaders.StreamingLoader`'s); augmentation draws from its own generator on the
    device. ``augment``: False/"none", True/"crop_flip" (zero-pad by ``pad``, random crop, flip) or
    "resized_crop" (random resized crop back to the stored size, flip).
    With ``world > 1`` every rank draws the same global permutation and augmentation and keeps its own
    contiguous share of each global batch, so N ranks see exactly the images one process would.
    ``state_dict`` captures the position inside an epoch, so an interrupted run resumes mid-epoch.
    """

    kind = "resident"

    def __init__(self, data: Arrays, batch_size: int, *, shuffle: bool = False, augment: bool | str = False,
                 drop_last: bool = False, device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                 world: int = 1, pad: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = torch.from_numpy(np.ascontiguousarray(data.x)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.y = torch.from_numpy(np.asarray(data.y, dtype=np.int64)).to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augment_mode(augment)
        self.rank, self.world, self.pad = rank, world, pad
        self.order = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(augment_seed(seed))
        self._perm: Tensor | None = None
        self._pos = 0
        self._epoch = 0  # permutations drawn so far

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _new_perm(self) -> Tensor:
        n = len(self.y)
        self._epoch += 1
        if self.shuffle:
            return torch.randperm(n, generator=self.order).to(self.device)
        return torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._perm is None:
            self._perm, self._pos = self._new_perm(), 0
        while self._pos < len(self):
            g = self.global_batch
            idx = self._perm[self._pos * g:(self._pos + 1) * g]
            x = self.x[idx]
            if self.augment == "crop_flip":
                x = crop_flip(x, self.pad, self.generator)
            x = x.float().div_(255)
            if self.augment == "resized_crop":
                x = resized_crop_flip(x, self.generator)
            lo = min(self.rank * self.batch_size, len(idx))
            hi = min(lo + self.batch_size, len(idx))
            self._pos += 1
            yield x[lo:hi], self.y[idx[lo:hi]]
        self._perm = None

    def state_dict(self) -> dict:
        return {"kind": self.kind, "perm": None if self._perm is None else self._perm.cpu(), "pos": self._pos,
                "epoch": self._epoch, "order": self.order.get_state(), "generator": self.generator.get_state(),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` was taken (by this loader or a :class:`~multiteach.loaders.StreamingLoader`:
        the order and position carry over, the augmentation's draws start afresh from the seed when the state is
        another loader's or another device's). A mid-epoch state holds the epoch's order over the split it was
        written with: a split of another size (``data.train_size`` changed under ``--force``) cannot continue
        it and is refused with :class:`~multiteach.checkpoint.CheckpointError`. Between epochs only the
        generators are kept, and the next epoch draws its order over the split as it is now."""
        check_resume_state(state, len(self.y), len(self), self.global_batch)
        perm = state["perm"]
        self._perm = None if perm is None else perm.to(self.device)
        self._pos = int(state["pos"])
        self._epoch = int(state.get("epoch", 0))
        if state.get("order") is not None:  # states are CPU byte tensors (a checkpoint may map them to the GPU)
            self.order.set_state(state["order"].cpu())
        if state.get("kind", self.kind) == self.kind and state.get("generator") is not None:
            try:
                self.generator.set_state(state["generator"].cpu())
            except RuntimeError:  # written on another device type: the augmentation restarts from the seed
                pass


__all__ = ["AUGMENTS", "IMAGE_EXTENSIONS", "NUM_CLASSES", "Arrays", "Files", "Images", "Split", "TensorLoader",
           "augment_mode", "check_resume_state", "crop_flip", "load_cifar", "load_npz_pair", "resize_arrays",
           "resized_crop_flip", "scan_image_folder", "split_validation", "synthetic"]
