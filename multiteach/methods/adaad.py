"""AdaAD and AdaIAD (Huang et al., CVPR 2023): the inner attack runs through the teacher, ascending the
divergence between the student's and the teacher's outputs on the same perturbed input x'; the student then
matches the teacher on x'. AdaIAD adds IAD's per-sample trust (see :mod:`.iad`)."""

from __future__ import annotations

from ..losses import CrossEntropy, KLDistill, Reduction
from ..recipe import STUDENT, Branch, Recipe
from ..teachers import Teacher
from ..transforms import PGD, Clean
from ._common import ModelLike, WeighterSpec, as_student, as_teacher, check_unused, register, weighter_for
from .iad import Introspection

ADAAD_SCHEDULE = {"epochs": 200, "milestones": (100, 150)}


def adaad_attack(teacher: Teacher, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10) -> PGD:
    """AdaAD's inner maximisation: PGD from x + 0.001 N(0, 1), student in eval mode, ascending the summed
    F.kl_div(log_softmax(S(x')), softmax(T(x'))) = KL(T(x') || S(x')), both outputs on the current x' and the
    gradient running through both networks to x'."""
    return PGD(eps=eps, alpha=alpha, steps=steps, start="normal", objective="kl", bn_mode="eval", through=teacher)


@register("adaad", "AdaAD, Huang et al. 2023: KL(T(x') || S(x')), x' maximising it through the teacher", ("adv",),
          **ADAAD_SCHEDULE)
def adaad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
          eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, alpha_kd: float = 1.0,
          reduction: Reduction | None = None, weighter: WeighterSpec = "fixed") -> Recipe:
    """AdaAD (boyellow/AdaAD, ``main.py --method AdaAD`` and ``AT_helper.adaad_inner_loss``): x' is PGD-10 with
    step 2/255 in the 8/255 ball (the README's CIFAR-10 command; the script's argparse defaults, 16/255 and
    4/255, are its "larger search radius" variant: ``eps=16/255, alpha=4/255``) from x + 0.001*N(0,1), the
    student in eval mode, ascending KL(T(x') || S(x')) summed, through the teacher at every step. Loss

        alpha KL(T(x') || S(x')) + (1 - alpha) KL(T(x) || S(x)),    alpha = 1,

    as the code's nn.KLDivLoss(log_softmax(S), softmax(T)): KL(T || S) in the usual notation, the teacher's
    distribution first, in the attack and in the loss (the method is often written KL(S || T)). Reduction as
    the code: nn.KLDivLoss's default mean over batch x classes on CIFAR-10, the per-sample sum averaged over
    the batch (batchmean) on CIFAR-100 (``reduction=None`` picks it from ``num_classes``). The clean branch
    comes first and runs at alpha = 1 too (weight 0): the code forwards S(x) then S(x') in train mode every
    step, which moves the BatchNorm running statistics that the eval-mode attack and evaluation read.
    Schedule: 200 epochs, SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, x0.1 at 100 and 150.
    ``weighter`` picks another weighter for the two terms."""
    check_unused(weighter, "fixed", alpha_kd=(alpha_kd, 1.0))
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    red: Reduction = reduction or ("mean" if num_classes == 10 else "batchmean")
    branches = [
        Branch(Clean(), KLDistill(1.0, red), teacher=teacher, name="nat_kl"),
        Branch(adaad_attack(teacher, eps, alpha, steps), KLDistill(1.0, red), teacher=teacher, name="adv_kl"),
    ]
    w = weighter_for(weighter, 2, "fixed", weights=[1.0 - alpha_kd, alpha_kd])
    return Recipe(as_student(student, num_classes), branches, w, name="adaad")


@register("adaiad", "AdaIAD, Huang et al. 2023: AdaAD's attack + IAD's loss, T = 30, trust p_T(y|x')^0.1 from "
          "epoch 60", ("adv",), **ADAAD_SCHEDULE)
def adaiad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
           eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, temperature: float = 30.0,
           alpha_kd: float = 1.0, beta: float = 0.1, begin: int = 60) -> Recipe:
    """AdaIAD (boyellow/AdaAD, ``main.py --method AdaAD_with_IAD1``): AdaAD's inner attack (as ``adaad``), then
    IAD-I's loss with the teacher on x':

        alpha tau^2 KL(T(x')/tau || S(x')/tau) + alpha mean_i (1 - a_i) KL(S(x)_i || S(x')_i)
            + (1 - alpha) CE(S(x), y),      a_i = p_T(y_i | x'_i)^beta  (T = 1, a constant)

    tau = 30 (the script's ``--temp`` default, which the README's command keeps), alpha = 1, beta = 0.1; the
    introspection term joins from epoch 60 (0-based). Both KL terms are batchmean on every dataset; S(x) is
    not detached. The code re-runs S(x) for each term (the same values in train mode; only the BN running
    statistics see the extra forwards), here once. Schedule as AdaAD's: 200 epochs, x0.1 at 100 and 150,
    weight decay 5e-4."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = adaad_attack(teacher, eps, alpha, steps)
    branches = [
        Branch(Clean(), CrossEntropy(), name="clean_ce"),
        Branch(pgd, KLDistill(temperature, "batchmean", temperature_squared=True), teacher=teacher, name="adv_kd"),
        Branch(pgd, KLDistill(1.0, "batchmean"), teacher=STUDENT, teacher_input=Clean(), name="introspection"),
    ]
    weighter = Introspection(3, [1.0 - alpha_kd, alpha_kd, alpha_kd], introspection=2, trust_from=1, beta=beta,
                             begin=begin)
    return Recipe(as_student(student, num_classes), branches, weighter, name="adaiad")


__all__ = ["adaad", "adaad_attack", "adaiad"]
