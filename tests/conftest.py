"""Shared fixtures: tiny models and toy data, so the whole suite runs on a 2-core CPU."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import multiteach as mt
from multiteach.data import Arrays, TensorLoader, synthetic
from multiteach.models import CifarResNet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def tiny_net(num_classes: int = 10, seed: int | None = None) -> torch.nn.Module:
    """A 2-stage CIFAR ResNet with BatchNorm (8 and 16 channels): real layers, CPU-cheap."""
    if seed is not None:
        torch.manual_seed(seed)
    return CifarResNet((1, 1), (8, 16), num_classes=num_classes)


def image_batch(seed: int = 5, n: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for hand-formula tests: images in [0.1, 0.9] (no clipping at the first PGD steps), labels."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def hinton_kd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 KL(softmax(t/T) || softmax(s/T)) summed over classes, in float64."""
    p = torch.softmax(t.double() / temperature, 1)
    return temperature ** 2 * (p * (torch.log(p) - torch.log_softmax(s.double() / temperature, 1))).sum(1)


class Sharp(torch.nn.Module):
    """A tiny net with its logits scaled by k: a teacher with confident predictions whose entropies differ."""

    def __init__(self, net: torch.nn.Module, k: float) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * self.net(x)


class SignalAtStep:
    """Wraps a recipe's forward and raises SIGTERM in the process after its k-th step."""

    def __init__(self, forward, k):
        self.forward, self.k, self.n = forward, k, 0

    def __call__(self, x, y, model=None):
        out = self.forward(x, y, model)
        self.n += 1
        if self.n == self.k:
            signal.raise_signal(signal.SIGTERM)
        return out


@pytest.fixture
def toy() -> Arrays:
    return synthetic(256, seed=0)


@pytest.fixture
def toy_loader(toy: Arrays) -> TensorLoader:
    return TensorLoader(toy, 32, shuffle=True, augment=True, drop_last=True, seed=0)


@pytest.fixture
def mtard_recipe() -> mt.Recipe:
    torch.manual_seed(0)
    return mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()))


def _decode_slice(split: str, n: int, seed: int) -> Arrays:
    from PIL import Image

    d = np.load(SHARED / f"{split}_jpeg.npz")
    blob, offs, y = d["jpeg"], d["offsets"], d["y"]
    idx = np.sort(np.random.default_rng(seed).choice(len(y), n, replace=False))
    x = np.stack([np.asarray(Image.open(io.BytesIO(blob[offs[i]:offs[i + 1]].tobytes())).convert("RGB"))
                  for i in idx])
    return Arrays(x, y[idx].astype(np.int64))


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random slice of the real CIFAR-10 (JPEG-75 copy) as train.npz/test.npz; synthetic if absent."""
    out = tmp_path_factory.mktemp("cifar_slice")
    for split, n in (("train", 1500), ("test", 300)):
        a = _decode_slice(split, n, 0) if SHARED.is_dir() else synthetic(n, seed=int(split == "test"))
        np.savez(out / f"{split}.npz", x=a.x, y=a.y)
    return out
