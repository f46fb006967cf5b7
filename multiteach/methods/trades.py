"""TRADES (Zhang et al., ICML 2019): the student distils from its own clean output on PGD examples."""

from __future__ import annotations

from ..losses import CrossEntropy, KLDistill
from ..recipe import STUDENT, Branch, Recipe
from ..transforms import Clean
from ._common import ModelLike, WeighterSpec, as_student, register, training_pgd, weighter_for


@register("trades", "TRADES, Zhang et al. 2019: CE(S(x)) + beta KL(S(x) || S(x_adv)), its repository's settings",
          epochs=76, milestones=(75,))
def trades(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, beta: float = 6.0,
           eps: float = 0.031, alpha: float = 0.007, steps: int = 10, weighter: WeighterSpec = "fixed") -> Recipe:
    """TRADES (yaodongyu/TRADES, train_trades_cifar10.py): beta = 6, eps 0.031, step 0.007, 10 steps; the attack
    ascends KL(S(x) || S(x_adv)) from x + 0.001*N(0,1) with the student in eval mode; the KL term is averaged
    per sample (batchmean) and back-propagates through both outputs; 76 epochs, LR x0.1 at 75.
    ``trades_mtard`` is the MTARD comparison's variant (eps 8/255, step 2/255)."""
    pgd = training_pgd(eps, alpha, steps, objective="kl")
    branches = [
        Branch(Clean(), CrossEntropy(), name="clean_ce"),
        Branch(pgd, KLDistill(1.0, "batchmean"), teacher=STUDENT, teacher_input=Clean(), name="robust_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches, weighter_for(weighter, 2, "fixed", weights=[1.0, beta]),
                  name="trades")


@register("trades_mtard", "TRADES as the MTARD/RSLAD comparison trains it: eps 8/255, step 2/255", epochs=100,
          milestones=(75, 90))
def trades_mtard(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, beta: float = 6.0,
                 eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 weighter: WeighterSpec = "fixed") -> Recipe:
    """``trades`` with the distillation papers' attack (eps 8/255, step 2/255; their schedule is not stated,
    100 epochs with decays at 75 and 90 here)."""
    recipe = trades(student, num_classes=num_classes, beta=beta, eps=eps, alpha=alpha, steps=steps,
                    weighter=weighter)
    recipe.name = "trades_mtard"
    return recipe
