"""Teachers: frozen by default (always in eval mode, no gradients, BN statistics that never move, no graph
kept), or trained online in the same step with their own loss and optimizer (a peer, as in PeerAiD)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import timm
from torch import Tensor, nn

from . import models as _models  # noqa: F401  (registers the CIFAR models in timm's registry)
from .checkpoint import load_weights


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear message for an unknown name."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
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
    """A network whose outputs are distillation targets; frozen unless ``trainable``.

    Built from a timm model name (``Teacher("cifar_wrn34_10", checkpoint="adv.pt")``) or any ``nn.Module``.
    Frozen: ``train()`` is a no-op and parameters never require grad, so a forward on a plain input keeps no
    graph; an input that requires grad (an attack crafted through the teacher) still gets its gradient.

    Trainable (an online peer): ``loss(teacher_out, student_out, y) -> per-sample`` is the teacher's own
    objective on the input its branch gives it (``student_out`` detached), minimised in the same step by its
    own optimizer, ``optimizer = {"name": "sgd", "lr": 0.1, ...}`` (any ``torch.optim`` class by name; it
    follows the student's LR schedule). The student distils from its detached output.
    """

    def __init__(
        self,
        model: nn.Module | str,
        checkpoint: str | os.PathLike | None = None,
        num_classes: int = 10,
        name: str | None = None,
        *,
        trainable: bool = False,
        loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        optimizer: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            name = name or model
            model = create_model(model, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Teacher needs an nn.Module or a timm model name, got {type(model).__name__}")
        if trainable and loss is None:
            raise ValueError("a trainable teacher needs its own loss: Teacher(..., trainable=True, loss=fn) with "
                             "fn(teacher_logits, student_logits, y) -> per-sample loss")
        if checkpoint is not None:
            load_weights(model, checkpoint)
        self.model = model
        self.name = name or type(model).__name__
        self.trainable = trainable
        self.loss = loss
        self.optimizer = dict(optimizer or {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
        self.model.requires_grad_(trainable)
        super().train(False)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    def train(self, mode: bool = True) -> Teacher:
        """Frozen teachers stay in eval mode whatever their container asks; trainable ones follow it."""
        return super().train(mode and self.trainable)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {'trainable' if self.trainable else 'frozen'}"


def as_teacher(module: nn.Module) -> Teacher:
    """``module`` as a :class:`Teacher`: a Teacher as it is, any other module wrapped frozen."""
    return module if isinstance(module, Teacher) else Teacher(module)


__all__ = ["Teacher", "as_teacher", "create_model", "load_model"]
