"""TRADES (Zhang et al., ICML 2019): the student distils from its own clean output on PGD examples."""

from __future__ import annotations

from ..losses import CrossEntropy, KLDistill
from ..recipe import STUDENT, Branch, Recipe
from ..transforms import Clean
from ._common import ModelLike, WeighterSpec, as_student, register, training_pgd, weighter_for


@register("trades", "TRADES, Zhang et al. 2019: CE(S(x)) + beta KL(S(x) || S(x_adv))", epochs=100,
          milestones=(75, 90))
def trades(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, beta: float = 6.0,
           eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, weighter: WeighterSpec = "fixed") -> Recipe:
    """TRADES (yaodongyu/TRADES): beta = 6; the attack ascends KL(S(x) || S(x_adv)) from x + 0.001*N(0,1)
    with the student in eval mode (the repository's step is 0.007; 2/255 here as in the MTARD comparison);
    the KL term is averaged per sample (batchmean) and back-propagates through both outputs."""
    pgd = training_pgd(eps, alpha, steps, objective="kl")
    branches = [
        Branch(Clean(), CrossEntropy(), name="clean_ce"),
        Branch(pgd, KLDistill(1.0, "batchmean"), teacher=STUDENT, teacher_input=Clean(), name="robust_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches, weighter_for(weighter, 2, "fixed", weights=[1.0, beta]),
                  name="trades")
