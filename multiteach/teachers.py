"""Frozen teachers: always in eval mode, no gradients, BN statistics that never move, no graph kept."""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .checkpoint import load_weights


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear message for an unknown name."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[-1]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}: use a timm model name; CIFAR models are "
            f"{', '.join(timm.list_models('cifar_*'))}"
        )
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def load_model(name: str, checkpoint: str | os.PathLike, num_classes: int = 10) -> nn.Module:
    """A timm model with the weights of ``checkpoint`` (weights only; a mismatch is explained)."""
    net = create_model(name, num_classes=num_classes)
    load_weights(net, checkpoint)
    return net


class Teacher(nn.Module):
    """A frozen network whose outputs are distillation targets.

    Built from a timm model name (``Teacher("cifar_wrn34_10", checkpoint="adv.pt")``) or any ``nn.Module``.
    ``train()`` is a no-op and parameters never require grad, so a forward on a plain input keeps no graph;
    an input that requires grad (an attack crafted against the teacher) still gets its gradient.
    """

    def __init__(
        self,
        model: nn.Module | str,
        checkpoint: str | os.PathLike | None = None,
        num_classes: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            name = name or model
            model = create_model(model, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Teacher needs an nn.Module or a timm model name, got {type(model).__name__}")
        if checkpoint is not None:
            load_weights(model, checkpoint)
        self.model = model
        self.name = name or type(model).__name__
        self.model.requires_grad_(False)
        self.set_fast_forward(None)
        super().train(False)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    def set_fast_forward(self, fn: nn.Module | None) -> None:
        """A faster stand-in used under autocast (see multiteach.fast); kept out of the state_dict."""
        object.__setattr__(self, "fast_forward", fn)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode whatever their container asks."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        # the BN-folded low-precision copy serves only under autocast; fp32 calls (evaluation) stay exact
        if self.fast_forward is not None and torch.is_autocast_enabled(x.device.type):
            return self.fast_forward(x)
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, frozen"


__all__ = ["Teacher", "create_model", "load_model"]
