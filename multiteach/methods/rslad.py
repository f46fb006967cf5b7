"""RSLAD (Zi et al., ICCV 2021): the robust teacher's clean soft labels supervise the clean and PGD terms."""

from __future__ import annotations

from ..losses import KLDistill
from ..recipe import Branch, Recipe
from ..transforms import Clean
from ._common import (
    ModelLike,
    WeighterSpec,
    as_student,
    as_teacher,
    kl_scale_for,
    register,
    training_pgd,
    weighter_for,
)


@register("rslad", "RSLAD, Zi et al. 2021: 5/6 KL(T(x) || S(x_adv)) + 1/6 KL(T(x) || S(x))", ("adv",),
          epochs=300, milestones=(215, 260, 285))
def rslad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
          eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, weighter: WeighterSpec = "fixed",
          kl_scale: float | None = None) -> Recipe:
    """RSLAD (zibojia/RSLAD): the teacher's clean soft labels supervise both terms; the attack ascends
    KL(T(x) || S(x_adv)) from x + 0.001*N(0,1), student in eval mode; KL averaged over batch x classes
    (x10 with 100 classes, as its CIFAR-100 script: ``kl_scale``); fixed weights 5/6, 1/6 (``weighter`` picks
    another)."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = training_pgd(eps, alpha, steps, objective="kl", reference=teacher)
    scale = kl_scale_for(kl_scale, num_classes)
    branches = [
        Branch(pgd, KLDistill(scale=scale), teacher=teacher, teacher_input=Clean(), name="adv_kl"),
        Branch(Clean(), KLDistill(scale=scale), teacher=teacher, name="nat_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches,
                  weighter_for(weighter, 2, "fixed", weights=[5 / 6, 1 / 6]), name="rslad")
