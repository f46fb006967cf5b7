"""What every preset shares: model arguments, teacher wrapping, the distillation papers' training PGD."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import PRESETS, Spec
from ..teachers import Teacher, create_model
from ..transforms import PGD
from ..weighting import Weighter, make_weighter

ModelLike = nn.Module | str
WeighterSpec = Spec | Weighter


def register(name: str, description: str, teachers: tuple[str, ...] = (), **schedule: Any) -> Any:
    """Register a preset: its one-line description, the teacher roles it takes (``adv`` -> ``adv_teacher``)
    and its official training schedule (epochs, milestones; any other TrainConfig default, e.g. ``select``)."""
    return PRESETS.register(name, description, teachers=teachers, schedule=schedule)


def as_student(student: ModelLike, num_classes: int) -> nn.Module:
    return create_model(student, num_classes=num_classes) if isinstance(student, str) else student


def as_teacher(teacher: ModelLike | None, num_classes: int, role: str) -> Teacher:
    if teacher is None:
        raise ValueError(f"this preset needs a {role} teacher: pass {role}_teacher=Teacher(name, checkpoint=...)")
    if isinstance(teacher, str):
        return Teacher(teacher, num_classes=num_classes)
    return teacher if isinstance(teacher, Teacher) else Teacher(teacher)


def training_pgd(eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, **kwargs: Any) -> PGD:
    """The PGD-10 the distillation papers train with: start x + 0.001*N(0,1), student in eval mode."""
    kwargs.setdefault("start", "normal")
    return PGD(eps=eps, alpha=alpha, steps=steps, **kwargs)


def weighter_for(spec: WeighterSpec, n: int, default: str, **official: Any) -> Weighter:
    """The preset's weighter: ``spec`` names any registered weighter with its options; the preset's official
    settings (``official``) apply when ``spec`` is its ``default`` weighter (a table's options override them)."""
    if isinstance(spec, Weighter):
        return make_weighter(spec, n)
    name = spec if isinstance(spec, str) else spec.get("name")
    return make_weighter(spec, n, **(official if name == default else {}))


def kl_scale_for(kl_scale: float | None, num_classes: int) -> float:
    """The KL's factor: as given, else the official scripts' (x10 in their CIFAR-100 scripts: MTARD, B-MTARD,
    RSLAD, and the ablations built on them; x1 otherwise)."""
    if kl_scale is not None:
        return kl_scale
    return 10.0 if num_classes == 100 else 1.0


def check_unused(spec: WeighterSpec, default: str, **options: tuple[Any, Any]) -> None:
    """Refuse options of the default weighter (``name=(value, default)``) set beside another weighter, which
    would ignore them."""
    name = spec if isinstance(spec, str) else type(spec).__name__.lower() if isinstance(spec, Weighter) else \
        spec.get("name")
    changed = [k for k, (v, d) in options.items() if _plain(v) != _plain(d)]
    if isinstance(spec, Weighter) and changed:  # built already, with its own options
        raise ValueError(f"{', '.join(changed)} would be ignored: the weighter is given built ({type(spec).__name__}"
                         f"); set {'it' if len(changed) == 1 else 'them'} there, e.g. {type(spec).__name__}(..., "
                         f"{changed[0]}=...)")
    if name != default and changed:
        raise ValueError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} {default}'s option"
                         f"{'' if len(changed) == 1 else 's'}, and the weighter is {name!r}: give its options in a "
                         f"table, e.g. weighter = {{name = \"{name}\", ...}}")


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, list | tuple) else v


__all__ = ["ModelLike", "WeighterSpec", "as_student", "as_teacher", "check_unused", "kl_scale_for", "register",
           "training_pgd", "weighter_for"]
