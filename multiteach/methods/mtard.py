"""MTARD (Zhao et al., ECCV 2022) and its ablations: an adversarial teacher on PGD examples and a natural
teacher on clean images, balanced by the Adaptive Normalization Loss; B-MTARD's temperature balance; N = 3."""

from __future__ import annotations

from collections.abc import Sequence

from ..balance import EntropyBalance
from ..losses import KLDistill, Reduction
from ..recipe import Branch, Recipe
from ..registry import PRESETS
from ..transforms import Clean, InputTransform
from ..weighting import Weighter
from ._common import (
    ModelLike,
    WeighterSpec,
    as_student,
    as_teacher,
    check_unused,
    kl_scale_for,
    register,
    training_pgd,
    weighter_for,
)

MTARD_SCHEDULE = {"epochs": 300, "milestones": (215, 260, 285)}


def _two_teacher_branches(adv: ModelLike, nat: ModelLike, eps: float, alpha: float, steps: int,
                          temperature: float, reduction: Reduction, start: str = "normal",
                          scale: float = 1.0) -> list[Branch]:
    return [
        Branch(training_pgd(eps, alpha, steps, start=start), KLDistill(temperature, reduction, scale), teacher=adv,
               name="adv"),
        Branch(Clean(), KLDistill(temperature, reduction, scale), teacher=nat, name="nat"),
    ]


@register("mtard", "MTARD, Zhao et al. 2022: adversarial + natural teacher balanced by ANL", ("adv", "nat"),
          **MTARD_SCHEDULE)
def mtard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
          nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
          alpha: float = 2 / 255, steps: int = 10, temperature: float = 1.0, reduction: Reduction = "mean",
          beta: float = 1.0, rw: float = 0.025, w0: Sequence[float] = (0.5, 0.5), weighter: WeighterSpec = "anl",
          start: str = "normal", kl_scale: float | None = None) -> Recipe:
    """MTARD (zhaoshiji123/MTARD): the adversarial teacher reads PGD-10 examples crafted against the student
    (eval mode, step 2/255, start x + 0.001*N(0,1), CE); the natural teacher reads clean images; KL at T = 1
    averaged over batch x classes (``reduction="batchmean"``: per sample, C times larger, the scale of a CE
    term), times 10 with 100 classes as its CIFAR-100 script (``kl_scale``); ANL with beta = 1, r_w = 0.025,
    w0 = 1/2, r_w decayed with the LR.
    ``weighter`` swaps ANL for any registered weighter with its options (``{"name": "dwa", "temperature": 2}``)
    on the same two branches; ``start="uniform"`` starts the attack anywhere in the eps-ball, as SAT trains
    its teacher.

    Where the official code differs, by choice: its attack takes its first gradient at x + 0.001 N unclipped
    (here clipped to [0, 1] first: ~0.3% of pixels differ); its KL reads log(p_teacher + 1e-5) (here the exact
    log: the loss's value, and so ANL's ratios, move slightly, its gradient not at all); it sets
    w_adv = 1 - w_nat (here each weight follows the recurrence, the same while ``w0`` sums to 1)."""
    check_unused(weighter, "anl", beta=(beta, 1.0), rw=(rw, 0.025), w0=(w0, (0.5, 0.5)))
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, temperature, reduction, start,
                                     kl_scale_for(kl_scale, num_classes))
    w = weighter_for(weighter, 2, "anl", beta=beta, rw=rw, w0=list(w0))
    return Recipe(as_student(student, num_classes), branches, w, name="mtard")


@register("bmtard", "MTARD + B-MTARD's entropy-balanced teacher temperatures (Zhao et al. 2024)",
          ("adv", "nat"), **MTARD_SCHEDULE)
def bmtard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
           nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
           alpha: float = 2 / 255, steps: int = 10, beta: float = 1.0, rw: float = 0.025,
           temperature_lr: float = 0.001, t_max: float = 10.0, weighter: WeighterSpec = "anl",
           reduction: Reduction = "mean", start: str = "normal", kl_scale: float | None = None) -> Recipe:
    """MTARD's two branches with per-teacher temperatures (start 1, in [1, 10], moved by 0.001 x sign of the
    entropy ratio each batch, decayed with the LR; zhaoshiji123/MTARD-extension) and the same ANL.
    ``reduction`` and ``start`` as in :func:`mtard` (the official script's: mean over batch x classes, x + 0.001 N),
    so a plan that sets them for MTARD trains this student alike."""
    recipe = mtard(student, adv_teacher, nat_teacher, num_classes=num_classes, eps=eps, alpha=alpha,
                   steps=steps, reduction=reduction, beta=beta, rw=rw, weighter=weighter, start=start,
                   kl_scale=kl_scale)
    recipe.balance = EntropyBalance(2, lr=temperature_lr, t_min=1.0, t_max=t_max)
    recipe.name = "bmtard"
    return recipe


@register("baseline", "Fig. 2 ablation 'Baseline': distillation from the adversarial teacher alone", ("adv",),
          **MTARD_SCHEDULE)
def baseline(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *,
             num_classes: int = 10, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
             reduction: Reduction = "mean", start: str = "normal", kl_scale: float | None = None) -> Recipe:
    """KL(T_adv(x_adv) || S(x_adv)), MTARD's adversarial branch with weight 1 (x10 with 100 classes)."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    kd = KLDistill(1.0, reduction, kl_scale_for(kl_scale, num_classes))
    branch = Branch(training_pgd(eps, alpha, steps, start=start), kd, teacher=adv, name="adv")
    return Recipe(as_student(student, num_classes), [branch], name="baseline")


@register("baseline_mt", "Fig. 2 ablation 'Baseline+MT': both teachers, fixed weights 1/2, 1/2",
          ("adv", "nat"), **MTARD_SCHEDULE)
def baseline_mt(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
                nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
                alpha: float = 2 / 255, steps: int = 10, reduction: Reduction = "mean",
                start: str = "normal", weighter: WeighterSpec = "fixed", kl_scale: float | None = None) -> Recipe:
    """MTARD's two branches with constant weights 1/2, 1/2 (no ANL)."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, 1.0, reduction, start,
                                     kl_scale_for(kl_scale, num_classes))
    return Recipe(as_student(student, num_classes), branches, weighter_for(weighter, 2, "fixed", weights=[0.5, 0.5]),
                  name="baseline_mt")


PRESETS.add("baseline_mt_anl", mtard, "Fig. 2 ablation 'Baseline+MT+ANL' (= mtard)", teachers=("adv", "nat"),
            schedule=MTARD_SCHEDULE)


@register("mtard3", "MTARD with a third, L2-robust teacher on L2-PGD inputs (N = 3), ANL over three losses",
          ("adv", "nat", "l2"), **MTARD_SCHEDULE)
def mtard3(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
           nat_teacher: ModelLike | None = None, l2_teacher: ModelLike | None = None, *, num_classes: int = 10,
           eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, l2_eps: float = 0.5,
           l2_alpha: float = 0.1, beta: float = 1.0, rw: float = 0.025, weighter: WeighterSpec = "anl",
           reduction: Reduction = "mean", kl_scale: float | None = None) -> Recipe:
    """MTARD's two branches plus KL(T_l2(x_l2) || S(x_l2)), x_l2 an L2 PGD example (eps 0.5, step 0.1) against
    the student: robustness to a second threat model from a teacher trained for it; ANL(3) balances them."""
    check_unused(weighter, "anl", beta=(beta, 1.0), rw=(rw, 0.025))
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    l2 = as_teacher(l2_teacher, num_classes, "l2")
    scale = kl_scale_for(kl_scale, num_classes)
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, 1.0, reduction, scale=scale)
    branches.append(Branch(training_pgd(l2_eps, l2_alpha, steps, norm="L2"), KLDistill(1.0, reduction, scale),
                           teacher=l2, name="l2"))
    return Recipe(as_student(student, num_classes), branches, weighter_for(weighter, 3, "anl", beta=beta, rw=rw),
                  name="mtard3")


def multi_teacher(student: ModelLike, teachers: Sequence[tuple[InputTransform, ModelLike]],
                  weighter: WeighterSpec | Weighter = "anl", *, num_classes: int = 10, temperature: float = 1.0,
                  reduction: Reduction = "mean") -> Recipe:
    """N teachers, each reading its own input transform, KL to each, balanced by ANL unless told otherwise."""
    branches = [
        Branch(t, KLDistill(temperature, reduction), teacher=as_teacher(m, num_classes, f"teacher{i}"),
               name=getattr(m, "name", f"teacher{i}"))
        for i, (t, m) in enumerate(teachers)
    ]
    return Recipe(as_student(student, num_classes), branches, weighter_for(weighter or "anl", len(branches), "anl"),
                  name="multi_teacher")
