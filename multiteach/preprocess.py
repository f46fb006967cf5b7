"""Normalisation and input size belong to the model: attacks stay in [0, 1] pixel space.

A network trained on normalised inputs (timm's ``pretrained_cfg`` mean/std, torchvision weights' transforms)
gets a :class:`Preprocess` in front of it, inside its wrapper, so every attack perturbs [0, 1] images and its
``eps`` is in pixel units whatever the network expects. A network with a fixed input size (224 px for ImageNet
weights) refuses images of another size with a one-line error naming both, unless it was asked to resize
them (``resize=True``): never silently. The CIFAR models take [0, 1] inputs as they are and get none.

``with_preprocessing(net, mean, std, input_size, resize)`` gives a module usable as student or teacher (a
:class:`Preprocessed`: its layers answer to the bare network's names too); a :class:`~multiteach.Teacher`
takes the same settings (``Teacher(net, mean=..., std=..., input_size=...)``). Being part of the module, the
preprocessing is folded, compiled and graphed with it on the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn


def _size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``224``, ``(224, 224)`` or timm's ``(3, 224, 224)`` as ``(H, W)``."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) not in (1, 2, 3):
        raise ValueError(f"input_size must be H, (H, W) or (C, H, W), got {size}")
    return (size[0], size[0]) if len(size) == 1 else size[-2:]  # type: ignore[return-value]


def size_mismatch(name: str, expected: tuple[int, int], got: tuple[int, int]) -> str:
    """The one-line refusal of images of the wrong size."""
    want, have = "x".join(map(str, expected)), "x".join(map(str, got))
    return (f"{name} takes {want} images but the data is {have}: pass resize=True (config: resize = true) to "
            f"resize them to {want}, or input_size={tuple(got)} to run it at the data's size")


def _fit(x: Tensor, size: tuple[int, int] | None, resize: bool, mode: str, name: str) -> Tensor:
    """``x`` at ``size``: resized when allowed, refused otherwise (a leaf of torch.fx traces: BN folding traces
    through the wrapper without evaluating the shape test)."""
    if size is None or tuple(x.shape[-2:]) == size:
        return x
    if not resize:
        raise ValueError(size_mismatch(name, size, tuple(x.shape[-2:])))
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(x, size=size, mode=mode, antialias=antialias,
                         **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))


torch.fx.wrap("_fit")


class Preprocess(nn.Module):
    """[0, 1] images -> what the network takes: resized to ``input_size`` (only with ``resize``; other sizes
    are refused) then ``(x - mean) / std`` per channel. ``mean``/``std`` None: no normalisation;
    ``input_size`` None: any size. ``interpolation``: ``bilinear`` (default), ``bicubic`` or ``nearest``."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_size: int | Sequence[int] | None = None, resize: bool = False,
                 interpolation: str = "bilinear", name: str = "model") -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("normalisation needs both mean and std (or neither)")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ValueError(f"mean has {len(mean)} channels but std {len(std)}")
            if any(s <= 0 for s in std):
                raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.input_size = _size(input_size)
        if resize and self.input_size is None:
            raise ValueError(f"{name}: resize=True needs the size to resize to: pass input_size=(H, W)")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation {interpolation!r}: use bilinear, bicubic or nearest")
        self.resize, self.interpolation, self.name = bool(resize), interpolation, name
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(shape),
                             persistent=False)

    @property
    def active(self) -> bool:
        """Whether it does anything (normalises, or checks a size)."""
        return self.mean is not None or self.input_size is not None

    def check(self, size: int | Sequence[int] | None) -> None:
        """Refuse data of image size ``size`` now (at build time) rather than at the first forward."""
        got = _size(size)
        if got is not None and self.input_size is not None and got != self.input_size and not self.resize:
            raise ValueError(size_mismatch(self.name, self.input_size, got))

    def forward(self, x: Tensor) -> Tensor:
        x = _fit(x, self.input_size, self.resize, self.interpolation, self.name)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def extra_repr(self) -> str:
        parts = []
        if self.mean is not None:
            parts.append(f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, "
                         f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}")
        if self.input_size is not None:
            parts.append(f"input_size={self.input_size}" + (f", resize ({self.interpolation})" if self.resize else ""))
        return ", ".join(parts)


class Preprocessed(nn.Module):
    """``net`` behind a :class:`Preprocess`: takes [0, 1] images of any allowed size (a student or teacher).
    Its state_dict holds ``net``'s weights under ``net.``; ``num_classes`` is the network's."""

    def __init__(self, net: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess, self.net = preprocess, net

    @property
    def num_classes(self) -> Any:
        return getattr(self.net, "num_classes", None)

    def get_submodule(self, target: str) -> nn.Module:
        """Layers by the bare network's names too (``"layer3"`` as well as ``"net.layer3"``): feature branches
        name a teacher's layers the same with or without preprocessing."""
        try:
            return super().get_submodule(target)
        except AttributeError:
            return self.net.get_submodule(target)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.preprocess(x))


def with_preprocessing(net: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       input_size: int | Sequence[int] | None = None, resize: bool = False,
                       interpolation: str = "bilinear", name: str | None = None) -> nn.Module:
    """``net`` taking [0, 1] images: normalised by ``mean``/``std`` and held to ``input_size`` (resized to it
    with ``resize``) inside the returned module. With nothing to do, ``net`` itself."""
    pre = Preprocess(mean, std, input_size, resize, interpolation, name=name or type(net).__name__)
    return Preprocessed(net, pre) if pre.active else net


__all__ = ["Preprocess", "Preprocessed", "size_mismatch", "with_preprocessing"]
