"""ARD (Goldblum et al., AAAI 2020): the student on PGD examples distils the robust teacher's clean output."""

from __future__ import annotations

from ..losses import CrossEntropy, KLDistill
from ..recipe import Branch, Recipe
from ..transforms import PGD, Clean
from ..weighting import Fixed
from ._common import ModelLike, as_student, as_teacher, register


@register("ard", "ARD, Goldblum et al. 2020: T^2 KL(T(x)/T || S(x_adv)/T), T = 30", ("adv",), epochs=200,
          milestones=(100,))
def ard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
        temperature: float = 30.0, alpha_kd: float = 1.0, eps: float = 8 / 255, alpha: float = 2 / 255,
        steps: int = 10) -> Recipe:
    """ARD (goldblum/AdversariallyRobustDistillation): PGD-10, step 2/255, uniform start, CE, student in
    train mode; loss alpha T^2 KL(T(x)/T || S(x_adv)/T) + (1 - alpha) CE(S(x), y), T = 30, alpha = 1; the
    KL is nn.KLDivLoss's default mean over batch x classes. Schedule: the paper states x0.1 at epochs 100 and
    150, but the code sets the LR from its argument at every epoch (0.1, then 0.01 from epoch 100), so it
    trains at 0.01 from 100 to 200: the registered schedule is the code's (one decay at 100)."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start="uniform", bn_mode="train")
    kd = KLDistill(temperature, "mean", temperature_squared=True)
    branches = [Branch(pgd, kd, teacher=teacher, teacher_input=Clean(), name="adv_kd")]
    weights = [alpha_kd]
    if alpha_kd < 1.0:
        branches.append(Branch(Clean(), CrossEntropy(), name="clean_ce"))
        weights.append(1.0 - alpha_kd)
    return Recipe(as_student(student, num_classes), branches, Fixed(weights), name="ard")
