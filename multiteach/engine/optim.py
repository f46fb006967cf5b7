"""Optimizers and the learning-rate schedule, from the config: SGD by default, any ``torch.optim`` class by
name with its options; piecewise (multistep), cosine (optionally held at the base LR first), constant,
one-cycle or cyclic (a triangle), with an optional linear warm-up.

The schedule is a factor of the base LR at a fractional epoch, applied to every param group each step (so a
budgeted run that changes its epoch count mid-run just follows the new cosine), and to every trainable
teacher's optimizer with its own base LR.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# one-cycle (Smith & Topin 2019) as torch's OneCycleLR defaults: from peak/25 up to the peak over the first 30%,
# then cosine down to peak/(25 * 1e4)
ONECYCLE_PCT, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4


def lr_factor(cfg: Any, epoch_progress: float) -> float:
    """LR / base LR at a (fractional) epoch: linear warm-up, then the config's schedule."""
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return (epoch_progress + 1e-9) / cfg.warmup_epochs
    if cfg.schedule == "piecewise":
        return cfg.gamma ** sum(epoch_progress >= m for m in cfg.milestones)
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    p = min(max((epoch_progress - cfg.warmup_epochs) / span, 0.0), 1.0)
    if cfg.schedule == "cosine":  # held at the base LR for a share of the epochs, then half a cosine to 0
        hold = cfg.hold_fraction
        return 0.5 * (1 + math.cos(math.pi * max(p - hold, 0.0) / (1 - hold)))
    if cfg.schedule == "cyclic":  # torch's CyclicLR from 0, one cycle: up for the first half, down for the second
        return 1.0 - abs(2.0 * p - 1.0)
    if cfg.schedule == "onecycle":
        start, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if p < ONECYCLE_PCT:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * p / ONECYCLE_PCT))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (p - ONECYCLE_PCT) / (1 - ONECYCLE_PCT)))
    return 1.0


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """A ``torch.optim`` optimizer by name, case-insensitive ("sgd", "adamw", "AdamW")."""
    choices = {n.lower(): c for n, c in vars(torch.optim).items()
               if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    if name.lower() not in choices:
        raise ValueError(f"unknown optimizer {name!r}: use a torch.optim class, e.g. "
                         f"{', '.join(sorted(n for n in choices if not n.startswith('_')))}")
    return choices[name.lower()]


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, options: Mapping[str, Any],
                    device: torch.device) -> torch.optim.Optimizer:
    """``torch.optim.<name>(groups, lr=lr, **options)``; unknown options are a one-line error naming them.
    On CUDA the fused implementation is used where the optimizer has one, on the CPU the foreach one."""
    cls = optimizer_class(name)
    accepted = inspect.signature(cls).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"optimizer {cls.__name__} has no option {', '.join(map(repr, unknown))}: its options are "
                         f"{', '.join(k for k in accepted if k not in ('params', 'lr'))}")
    impl = "fused" if device.type == "cuda" else "foreach"
    extra = {impl: True} if impl in accepted and impl not in options else {}
    return cls(groups, lr=lr, **options, **extra)


def lr_scales(model: torch.nn.Module) -> dict[int, float]:
    """``id(parameter) -> LR multiplier`` from the model's ``param_lr_scales()`` (parameter name -> multiplier),
    where it declares one (airbench's 64x for its BatchNorm biases); empty otherwise."""
    declared = getattr(model, "param_lr_scales", None)
    if declared is None:
        return {}
    named = dict(model.named_parameters())
    scales = declared()
    unknown = sorted(set(scales) - set(named))
    if unknown:
        raise ValueError(f"{type(model).__name__}.param_lr_scales() names no parameter of the model: "
                         f"{', '.join(unknown[:3])}")
    return {id(named[name]): float(scale) for name, scale in scales.items()}


def student_optimizer(cfg: Any, student: Iterable[torch.nn.Parameter], extra: Iterable[torch.nn.Parameter],
                      device: torch.device, scales: Mapping[int, float] | None = None) -> torch.optim.Optimizer:
    """The student's optimizer: its parameters with the config's weight decay, the recipe's own (uncertainty
    weights, projectors) in a last group without it. ``scales`` (:func:`lr_scales`) puts parameters of another
    LR multiplier in their own group, their weight decay divided by it: the decay per step (LR x decay) stays."""
    student, scales = list(student), scales or {}
    groups: list[dict[str, Any]] = []
    for scale in sorted({scales.get(id(p), 1.0) for p in student}):
        groups.append({"params": [p for p in student if scales.get(id(p), 1.0) == scale], "lr_scale": scale,
                       "weight_decay": cfg.weight_decay / scale, "lr": cfg.lr * scale})
    extra = list(extra)
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    options = dict(cfg.optimizer_options)
    if optimizer_class(cfg.optimizer) is torch.optim.SGD:
        options = {"momentum": cfg.momentum, "nesterov": cfg.nesterov, **options}
    return build_optimizer(cfg.optimizer, groups, cfg.lr, options, device)


def teacher_optimizer(spec: Mapping[str, Any], params: Iterable[torch.nn.Parameter],
                      device: torch.device) -> torch.optim.Optimizer:
    """A trainable teacher's own optimizer from its ``{"name": ..., "lr": ..., **options}``."""
    options = dict(spec)
    name = options.pop("name", "sgd")
    lr = options.pop("lr", 0.1)
    return build_optimizer(name, [{"params": list(params)}], lr, options, device)


def set_lr(optimizers: Iterable[tuple[torch.optim.Optimizer, float]], factor: float) -> None:
    """Every param group of each ``(optimizer, base_lr)`` to ``base_lr * factor`` (times the group's
    ``lr_scale``, where it has one)."""
    for opt, base in optimizers:
        for g in opt.param_groups:
            g["lr"] = base * factor * g.get("lr_scale", 1.0)


def cycled_momentum(cfg: Any, factor: float) -> float | None:
    """SGD momentum at LR factor ``factor`` of a cyclic schedule with ``cycle_momentum``: from ``momentum`` at
    LR 0 down to ``cycle_momentum`` at the peak, against the LR, as torch's CyclicLR; None otherwise."""
    if getattr(cfg, "cycle_momentum", None) is None:
        return None
    return cfg.momentum - (cfg.momentum - cfg.cycle_momentum) * factor


__all__ = ["build_optimizer", "cycled_momentum", "lr_factor", "lr_scales", "optimizer_class", "set_lr",
           "student_optimizer", "teacher_optimizer"]
