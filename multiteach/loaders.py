"""Two loaders behind one interface, and the choice between them.

:class:`~multiteach.data.TensorLoader` holds a whole split on the training device as uint8 and augments
batches there; :class:`StreamingLoader` reads the images in ``torch.utils.data.DataLoader`` worker processes
(decoding, resizing and augmentation on the CPU: torchvision.transforms.v2 for resizes and random-resized crops;
pinned memory on CUDA; persistent workers) for the splits that do not fit. Both:

- take the order of each epoch from one permutation drawn on the CPU from ``seed``
  (``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` for the first epoch, the next draws of
  the same generator after it), so the same seed gives the same batches in either loader and on any device;
- shard it across ranks: with ``world`` ranks each takes its contiguous share of every global batch of
  ``batch_size * world`` images, so N ranks see what one process sees;
- resume mid-epoch: ``state_dict()`` holds the epoch's permutation, the batches served and the generator, and
  ``load_state_dict`` continues from there (either loader's state; a state over another split size or batch
  count is refused with :class:`~multiteach.checkpoint.CheckpointError`);
- yield ``(x, y)`` on ``.device``: x float NCHW in [0, 1], y int64; ``len()`` batches per epoch, ``position``
  (batches served in this epoch), ``end_epoch()``.

:func:`make_loader` picks one (``data.loader``): ``resident`` when the split's uint8 size is at most
:data:`RESIDENT_MEMORY_FRACTION` of the free GPU memory (on the CPU: arrays always, image files never),
``stream`` otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .data import Arrays, EpochCursor, Files, Split, TensorLoader, augment_mode, augment_seed, check_resume_state

RESIDENT_MEMORY_FRACTION = 0.25  # of the free GPU memory when the loader is chosen (models not yet moved there)
RESIZED_CROP_EVAL_CROP = 0.875  # evaluation after random-resized-crop training: resize to size / 0.875, centre crop


class Loader(Protocol):
    """What the trainer reads from a loader (both :class:`TensorLoader` and :class:`StreamingLoader`)."""

    device: torch.device
    kind: str

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    @property
    def position(self) -> int: ...
    def end_epoch(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def default_workers() -> int:
    """min(8, the CPUs this process may run on)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def resolve_augment(augment: str, image_size: int | None) -> str:
    """``auto``: crop_flip for images up to 64 px (CIFAR, SVHN, Tiny-ImageNet), resized_crop above."""
    if augment == "auto":
        return "crop_flip" if (image_size or 32) <= 64 else "resized_crop"
    return augment_mode(augment)


def eval_crop(augment: str) -> float:
    """The centre crop's share of the resized image at evaluation: 0.875 after random-resized-crop training (the
    ImageNet convention), else 1 (the whole image)."""
    return RESIZED_CROP_EVAL_CROP if augment == "resized_crop" else 1.0


def _worker_context(workers: int) -> Any:
    """Fork on Linux, whatever the process's default (a rank started by ``torch.multiprocessing.spawn`` would
    spawn its workers too): a forked worker shares the split's arrays and paths with its parent, copy-on-write,
    where a spawned one is sent a pickled copy and imports torch again. Elsewhere the platform's default."""
    if workers == 0 or not sys.platform.startswith("linux"):
        return None
    import multiprocessing

    return multiprocessing.get_context("fork")


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class PadCropFlip:
    """Zero-pad by ``pad``, crop a random window of the original size, flip half the images (as
    :func:`~multiteach.data.crop_flip` does on the device), its three draws taken from a hash of the image's
    seed: one image at a time without torchvision's per-call overhead or the global generator."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, img: Tensor, seed: int) -> Tensor:
        r = _mix(seed)
        p, span = self.pad, 2 * self.pad + 1
        dy, dx, flip = r % span, (r >> 16) % span, (r >> 32) & 1
        h, w = img.shape[-2:]
        if p:
            img = torch.nn.functional.pad(img, (p, p, p, p))[:, dy:dy + h, dx:dx + w]
        return img.flip(-1) if flip else img


def _sample_seed(seed: int, epoch: int, slot: int) -> int:
    """The augmentation seed of the image at ``slot`` of the global order in ``epoch``: the same whatever the
    number of ranks and workers, and after a resume."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + slot) % 2**63


class _Reader(torch.utils.data.Dataset):
    """Reads image ``i`` of a split as uint8 CHW and applies the (seeded) transform; runs in the workers.

    Items are ``(index, seed)`` pairs. A file that cannot be decoded is returned as ``(None, message)``, so the
    main process raises one line naming it (not a worker's traceback)."""

    def __init__(self, split: Split, transform: Callable | None, base: Callable[[Tensor], Tensor] | None,
                 size: tuple[int, int] | None) -> None:
        self.split, self.transform, self.base, self.size = split, transform, base, size

    def __len__(self) -> int:
        return len(self.split)

    def read(self, i: int) -> Tensor:
        if isinstance(self.split, Arrays):
            return torch.from_numpy(np.ascontiguousarray(self.split.x[i])).permute(2, 0, 1)
        from torchvision.io import ImageReadMode, decode_image

        path = self.split.path(i)
        try:
            return decode_image(path, mode=ImageReadMode.RGB)
        except Exception:  # a format torchvision's decoders lack (BMP, TIFF, ...): PIL
            from PIL import Image
            from torchvision.transforms.v2.functional import pil_to_tensor

            with Image.open(path) as im:
                return pil_to_tensor(im.convert("RGB"))

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, Any]:
        i, seed = item
        try:
            img = self.read(i)
            if self.base is not None and tuple(img.shape[-2:]) != self.size:  # size None: always
                img = self.base(img)
            if isinstance(self.transform, PadCropFlip):
                img = self.transform(img, seed)
            elif self.transform is not None:
                with torch.random.fork_rng(devices=[]):  # v2's transforms draw from the global CPU generator
                    torch.default_generator.manual_seed(seed)  # (torch.manual_seed also seeds CUDA: ~100x slower)
                    img = self.transform(img)
        except Exception as e:
            where = self.split.path(i) if isinstance(self.split, Files) else f"image {i}"
            return None, f"cannot read {where}: {type(e).__name__}: {e}".replace("\n", " ")
        return img.contiguous(), int(self.split.y[i])


def _collate(batch: list[tuple[Tensor | None, Any]]) -> tuple[Tensor | None, Any]:
    for img, info in batch:
        if img is None:
            return None, info
    if not batch:  # a rank's share of the last global batch can be empty
        return None, None
    return torch.stack([img for img, _ in batch]), torch.tensor([y for _, y in batch], dtype=torch.int64)


class _ShardBatches:
    """The batch sampler: this rank's share of each global batch of the current permutation, from ``start``,
    each index paired with its augmentation seed. Its fields are set before each pass of the DataLoader."""

    def __init__(self, loader: StreamingLoader) -> None:
        self.loader = loader
        self.perm: np.ndarray = np.arange(0)
        self.start = 0
        self.epoch = 0

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ld = self.loader
        g = ld.global_batch
        for b in range(self.start, len(ld)):
            idx = self.perm[b * g:(b + 1) * g]
            lo = min(ld.rank * ld.batch_size, len(idx))
            hi = min(lo + ld.batch_size, len(idx))
            yield [(int(idx[k]), _sample_seed(ld.seed, self.epoch, b * g + k)) for k in range(lo, hi)]


class StreamingLoader(EpochCursor):
    """Batches of one split read by DataLoader workers: decoded, resized and augmented on the CPU, moved to
    ``device`` (from pinned memory on CUDA) and scaled to [0, 1] there.

    ``split``: :class:`Arrays` (images at their stored size) or :class:`Files` (any size: resized to
    ``image_size``). ``augment``: "none", "crop_flip" (files: resize the shorter side to ``image_size`` and
    centre-crop; then :class:`PadCropFlip`: zero-pad by ``pad``, random crop, flip) or "resized_crop"
    (torchvision.transforms.v2 RandomResizedCrop to ``image_size`` and RandomHorizontalFlip). Without
    augmentation files are resized to ``image_size / crop`` and centre-cropped to ``image_size`` (a file already
    at that size, with ``crop`` 1, is taken as it is).
    Augmentation is seeded per image from ``seed``, the epoch and the image's place in the global order, so it
    does not depend on the number of workers or ranks, and a resumed epoch repeats it. ``workers``: 0 reads in
    this process. Order, sharding and resume: see the module's docstring.
    """

    kind = "stream"

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: bool | str = False,
                 drop_last: bool = False, device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                 world: int = 1, image_size: int | None = None, crop: float = 1.0, pad: int = 4,
                 workers: int | None = None, prefetch: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(split, Files) and image_size is None:
            raise ValueError("a split of image files needs image_size (the size every image is resized to)")
        self.split = split
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augment_mode(augment)
        self.rank, self.world, self.pad = rank, world, pad
        self.seed = augment_seed(seed)
        self.workers = default_workers() if workers is None else workers
        self.prefetch = prefetch
        self.order = torch.Generator().manual_seed(seed)
        if isinstance(split, Files):
            self.image_hw: tuple[int, int] = (image_size, image_size)  # type: ignore[assignment]
        else:
            self.image_hw = (int(split.x.shape[1]), int(split.x.shape[2]))
        transform, base, resize_to = self._transforms(image_size, crop)
        self._reader = _Reader(split, transform, base, size=self.image_hw if resize_to == image_size else None)
        self._batches = _ShardBatches(self)
        self._loader: torch.utils.data.DataLoader | None = None
        self._perm: np.ndarray | None = None
        self._pos = 0
        self._epoch = 0

    def _transforms(self, size: int | None, crop: float) -> tuple[Callable | None, Callable | None, int | None]:
        """(random transform, deterministic base transform applied before it, the size the base resizes to)."""
        from torchvision.transforms import v2

        hw = list(self.image_hw)
        base, resize_to = None, None
        if isinstance(self.split, Files) and self.augment != "resized_crop":
            resize_to = round(int(size) / (1.0 if self.augment == "crop_flip" else crop))  # type: ignore[arg-type]
            base = v2.Compose([v2.Resize(resize_to, antialias=True), v2.CenterCrop(hw)])
        if self.augment == "crop_flip":
            return PadCropFlip(self.pad), base, resize_to
        if self.augment == "resized_crop":
            return v2.Compose([v2.RandomResizedCrop(hw, antialias=True), v2.RandomHorizontalFlip()]), base, resize_to
        return None, base, resize_to

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _dataloader(self, persistent: bool = True) -> torch.utils.data.DataLoader:
        if self._loader is None:
            w = self.workers
            self._loader = torch.utils.data.DataLoader(
                self._reader, batch_sampler=self._batches, num_workers=w, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", persistent_workers=persistent and w > 0,
                prefetch_factor=self.prefetch if w > 0 else None, multiprocessing_context=_worker_context(w))
        return self._loader

    def _new_perm(self) -> np.ndarray:
        n = len(self.split)
        self._epoch += 1
        if self.shuffle:
            return torch.randperm(n, generator=self.order).numpy()
        return np.arange(n)

    def batches_uint8(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This epoch's (rest of) batches as uint8 NCHW and int64 labels on the CPU, without moving the position."""
        if self._perm is None:
            self._perm, self._pos = self._new_perm(), 0
        self._batches.perm, self._batches.start, self._batches.epoch = self._perm, self._pos, self._epoch
        for x, y in self._dataloader():
            if x is None:
                if y is not None:
                    raise ValueError(y)
                x, y = torch.empty((0, 3, *self.image_hw), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
            yield x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.batches_uint8():
            self._pos += 1
            yield x.to(self.device, non_blocking=True).float().div_(255), y.to(self.device, non_blocking=True)
        self._perm = None

    def state_dict(self) -> dict:
        return {"kind": self.kind, "perm": None if self._perm is None else torch.from_numpy(self._perm.copy()),
                "pos": self._pos, "epoch": self._epoch, "order": self.order.get_state(), "augment_seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` (this loader's or a :class:`TensorLoader`'s) was taken; refused, as
        :meth:`TensorLoader.load_state_dict`, when the split or the batch count changed mid-epoch."""
        check_resume_state(state, len(self.split), len(self), self.global_batch)
        perm = state["perm"]
        self._perm = None if perm is None else np.asarray(perm.cpu() if isinstance(perm, Tensor) else perm,
                                                          dtype=np.int64)
        self._pos = int(state["pos"])
        self._epoch = int(state.get("epoch", 0))
        if state.get("order") is not None:  # a CPU byte tensor (a checkpoint may map it to the GPU)
            self.order.set_state(state["order"].cpu())
        if state.get("augment_seed") is not None:
            self.seed = int(state["augment_seed"])

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None


def decode(split: Files, image_size: int, crop: float = 1.0, workers: int | None = None,
           batch_size: int = 256) -> Arrays:
    """Every image of ``split`` resized (shorter side to ``image_size / crop``) and centre-cropped to
    ``image_size``, as uint8 NHWC arrays, in the split's order (read by ``workers`` processes)."""
    loader = StreamingLoader(split, batch_size, image_size=image_size, crop=crop, workers=workers)
    loader._dataloader(persistent=False)  # one pass: no workers left behind
    out = np.empty((len(split), image_size, image_size, 3), dtype=np.uint8)
    i = 0
    for x, _ in loader.batches_uint8():
        out[i:i + len(x)] = x.permute(0, 2, 3, 1).numpy()
        i += len(x)
    return Arrays(out, split.y.copy())


def split_bytes(split: Split, image_size: int | None) -> int:
    """The split's size as uint8 images on the device (files: at ``image_size``)."""
    if isinstance(split, Arrays):
        return int(split.x.nbytes)
    return len(split) * 3 * int(image_size or 0) ** 2


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def choose_loader(split: Split, kind: str, device: torch.device, image_size: int | None = None) -> tuple[str, str]:
    """("resident" or "stream", why): ``kind`` unless "auto"; on CUDA resident when the split's uint8 size is at
    most :data:`RESIDENT_MEMORY_FRACTION` of the free memory; elsewhere resident for arrays, stream for files."""
    size = split_bytes(split, image_size)
    what = f"{len(split):,} images, {_human(size)} as uint8"
    if kind in ("resident", "stream"):
        return kind, f"{what}; data.loader = {kind!r}"
    if kind != "auto":
        raise ValueError(f"unknown loader {kind!r}: use auto, resident or stream")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = RESIDENT_MEMORY_FRACTION * free
        fits = size <= budget
        return ("resident" if fits else "stream"), (f"{what}, {'within' if fits else 'over'} "
                                                    f"{RESIDENT_MEMORY_FRACTION:.0%} of {_human(free)} free")
    if isinstance(split, Arrays):
        return "resident", f"{what}; arrays on the {device.type} are held whole"
    return "stream", f"{what}; image files on the {device.type} are read as needed"


def make_loader(split: Split, batch_size: int, *, train: bool, kind: str = "auto", augment: str = "none",
                image_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                world: int = 1, workers: int | None = None, pad: int = 4,
                log: Callable[[str], Any] | None = None, name: str = "") -> TensorLoader | StreamingLoader:
    """A training loader (``train``: shuffled, augmented with ``augment``, incomplete last batch dropped) or an
    evaluation one (in order, no augmentation, files centre-cropped as after ``augment`` training), resident or
    streaming as :func:`choose_loader` decides; ``log`` gets one line saying which and why."""
    device = torch.device(device)
    mode = augment_mode(augment)
    crop = 1.0 if train else eval_crop(mode)
    chosen, why = choose_loader(split, kind, device, image_size)
    if log is not None:
        n = default_workers() if workers is None else workers
        how = f"resident on {device}" if chosen == "resident" else f"streamed by {n} worker{'s' * (n != 1)}"
        log(f"{name or 'data'}: {how} ({why})")
    opts = dict(shuffle=train, augment=mode if train else "none", drop_last=train, device=device, seed=seed,
                rank=rank, world=world, pad=pad)
    if chosen == "resident":
        arrays = split if isinstance(split, Arrays) else decode(split, int(image_size or 0), crop, workers)
        return TensorLoader(arrays, batch_size, **opts)  # type: ignore[arg-type]
    return StreamingLoader(split, batch_size, image_size=image_size, crop=crop, workers=workers,
                           **opts)  # type: ignore[arg-type]


__all__ = ["RESIDENT_MEMORY_FRACTION", "Loader", "PadCropFlip", "StreamingLoader", "choose_loader", "decode",
           "default_workers", "eval_crop", "make_loader", "resolve_augment", "split_bytes"]
