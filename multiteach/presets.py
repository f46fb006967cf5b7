"""Presets: each method of the MTARD paper's comparison as a few lines wiring the same interfaces.

A preset takes a student (a module or a timm name) and its teachers (``Teacher``, module or timm name) and
returns a :class:`~multiteach.Recipe`. Settings come from the official repositories and papers, stated in
each docstring; ``PRESETS`` lists them with a one-line description and their official training schedule.
All attacks are L-inf, eps 8/255, inputs in [0, 1].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .balance import EntropyBalance
from .losses import CrossEntropy, KLDistill, Reduction
from .recipe import STUDENT, Branch, Recipe
from .teachers import Teacher, create_model
from .transforms import PGD, Clean, InputTransform
from .weighting import ANL, Fixed, Weighter, make_weighter

ModelLike = nn.Module | str


@dataclass
class PresetInfo:
    fn: Callable[..., Recipe]
    description: str
    teachers: tuple[str, ...]
    schedule: dict[str, Any] = field(default_factory=dict)  # the official epochs / milestones

    def options(self) -> dict[str, Any]:
        """The preset's keyword options (``ExperimentConfig.options``) with their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "num_classes"}


PRESETS: dict[str, PresetInfo] = {}


def register(name: str, description: str, teachers: tuple[str, ...] = (), **schedule: Any) -> Callable:
    def wrap(fn: Callable[..., Recipe]) -> Callable[..., Recipe]:
        PRESETS[name] = PresetInfo(fn, description, teachers, schedule)
        return fn
    return wrap


def get_preset(name: str) -> PresetInfo:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def as_student(student: ModelLike, num_classes: int) -> nn.Module:
    return create_model(student, num_classes=num_classes) if isinstance(student, str) else student


def as_teacher(teacher: ModelLike | None, num_classes: int, role: str) -> nn.Module:
    if teacher is None:
        raise ValueError(f"this preset needs a {role} teacher: pass {role}_teacher=Teacher(name, checkpoint=...)")
    if isinstance(teacher, str):
        return Teacher(teacher, num_classes=num_classes)
    return teacher if isinstance(teacher, Teacher) else Teacher(teacher)


def training_pgd(eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, **kwargs: Any) -> PGD:
    """The PGD-10 the distillation papers train with: start x + 0.001*N(0,1), student in eval mode."""
    kwargs.setdefault("start", "normal")
    return PGD(eps=eps, alpha=alpha, steps=steps, **kwargs)


@register("natural", "cross-entropy on clean images (natural teachers, the 'Natural' row)", epochs=200,
          milestones=(100, 150))
def natural(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, label_smoothing: float = 0.0) -> Recipe:
    """Standard training: CE(S(x), y)."""
    return Recipe(as_student(student, num_classes), [Branch(Clean(), CrossEntropy(label_smoothing), name="ce")],
                  name="natural")


@register("sat", "PGD adversarial training, Madry et al. 2018 (SAT / PGD-AT)", epochs=200, milestones=(100, 150))
def sat(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10, start: str = "uniform", bn_mode: str = "eval",
        norm: str = "Linf") -> Recipe:
    """CE(S(x_adv), y), x_adv = PGD-10 (step 2/255, uniform start) against the student in eval mode, as in
    the MTARD/RSLAD comparison (Madry et al. train in train mode with step 2/255 too; ``bn_mode`` picks).
    ``norm="L2"`` (e.g. eps 0.5, alpha 0.1) trains an L2-robust model."""
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode, norm=norm)
    return Recipe(as_student(student, num_classes), [Branch(pgd, CrossEntropy(), name="adv_ce")], name="sat")


@register("trades", "TRADES, Zhang et al. 2019: CE(S(x)) + beta KL(S(x) || S(x_adv))", epochs=100,
          milestones=(75, 90))
def trades(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, beta: float = 6.0,
           eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10) -> Recipe:
    """TRADES (yaodongyu/TRADES): beta = 6; the attack ascends KL(S(x) || S(x_adv)) from x + 0.001*N(0,1)
    with the student in eval mode (the repository's step is 0.007; 2/255 here as in the MTARD comparison);
    the KL term is averaged per sample (batchmean) and back-propagates through both outputs."""
    pgd = training_pgd(eps, alpha, steps, objective="kl")
    branches = [
        Branch(Clean(), CrossEntropy(), name="clean_ce"),
        Branch(pgd, KLDistill(1.0, "batchmean"), teacher=STUDENT, teacher_input=Clean(), name="robust_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches, Fixed([1.0, beta]), name="trades")


@register("ard", "ARD, Goldblum et al. 2020: T^2 KL(T(x)/T || S(x_adv)/T), T = 30", ("adv",), epochs=200,
          milestones=(100, 150))
def ard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
        temperature: float = 30.0, alpha_kd: float = 1.0, eps: float = 8 / 255, alpha: float = 2 / 255,
        steps: int = 10) -> Recipe:
    """ARD (goldblum/AdversariallyRobustDistillation): PGD-10, step 2/255, uniform start, CE, student in
    train mode; loss alpha T^2 KL(T(x)/T || S(x_adv)/T) + (1 - alpha) CE(S(x), y), T = 30, alpha = 1; the
    KL is nn.KLDivLoss's default mean over batch x classes."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start="uniform", bn_mode="train")
    kd = KLDistill(temperature, "mean", temperature_squared=True)
    branches = [Branch(pgd, kd, teacher=teacher, teacher_input=Clean(), name="adv_kd")]
    weights = [alpha_kd]
    if alpha_kd < 1.0:
        branches.append(Branch(Clean(), CrossEntropy(), name="clean_ce"))
        weights.append(1.0 - alpha_kd)
    return Recipe(as_student(student, num_classes), branches, Fixed(weights), name="ard")


@register("rslad", "RSLAD, Zi et al. 2021: 5/6 KL(T(x) || S(x_adv)) + 1/6 KL(T(x) || S(x))", ("adv",),
          epochs=300, milestones=(215, 260, 285))
def rslad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
          eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10) -> Recipe:
    """RSLAD (zibojia/RSLAD): the teacher's clean soft labels supervise both terms; the attack ascends
    KL(T(x) || S(x_adv)) from x + 0.001*N(0,1), student in eval mode; KL averaged over batch x classes."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = training_pgd(eps, alpha, steps, objective="kl", reference=teacher)
    branches = [
        Branch(pgd, KLDistill(), teacher=teacher, teacher_input=Clean(), name="adv_kl"),
        Branch(Clean(), KLDistill(), teacher=teacher, name="nat_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches, Fixed([5 / 6, 1 / 6]), name="rslad")


def _two_teacher_branches(adv: nn.Module, nat: nn.Module, eps: float, alpha: float, steps: int,
                          temperature: float, reduction: Reduction, start: str = "normal") -> list[Branch]:
    return [
        Branch(training_pgd(eps, alpha, steps, start=start), KLDistill(temperature, reduction), teacher=adv,
               name="adv"),
        Branch(Clean(), KLDistill(temperature, reduction), teacher=nat, name="nat"),
    ]


@register("mtard", "MTARD, Zhao et al. 2022: adversarial + natural teacher balanced by ANL", ("adv", "nat"),
          epochs=300, milestones=(215, 260, 285))
def mtard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
          nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
          alpha: float = 2 / 255, steps: int = 10, temperature: float = 1.0, reduction: Reduction = "mean",
          beta: float = 1.0, rw: float = 0.025, w0: Sequence[float] = (0.5, 0.5), weighter: str = "anl",
          start: str = "normal") -> Recipe:
    """MTARD (zhaoshiji123/MTARD): the adversarial teacher reads PGD-10 examples crafted against the student
    (eval mode, step 2/255, start x + 0.001*N(0,1), CE); the natural teacher reads clean images; KL at T = 1
    averaged over batch x classes (``reduction="batchmean"``: per sample, C times larger, the scale of a CE
    term); ANL with beta = 1, r_w = 0.025, w0 = 1/2, r_w decayed with the LR.
    ``weighter`` swaps ANL for another of ``WEIGHTERS`` (dwa, uw, rlw, fixed) on the same two branches;
    ``start="uniform"`` starts the attack anywhere in the eps-ball, as SAT trains its teacher."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, temperature, reduction, start)
    w = ANL(2, beta, rw, w0) if weighter == "anl" else make_weighter(weighter, 2)
    return Recipe(as_student(student, num_classes), branches, w, name="mtard")


@register("bmtard", "MTARD + B-MTARD's entropy-balanced teacher temperatures (Zhao et al. 2024)",
          ("adv", "nat"), epochs=300, milestones=(215, 260, 285))
def bmtard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
           nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
           alpha: float = 2 / 255, steps: int = 10, beta: float = 1.0, rw: float = 0.025,
           temperature_lr: float = 0.001, t_max: float = 10.0) -> Recipe:
    """MTARD's two branches with per-teacher temperatures (start 1, in [1, 10], moved by 0.001 x sign of the
    entropy ratio each batch, decayed with the LR; zhaoshiji123/MTARD-extension) and the same ANL."""
    recipe = mtard(student, adv_teacher, nat_teacher, num_classes=num_classes, eps=eps, alpha=alpha,
                   steps=steps, beta=beta, rw=rw)
    recipe.balance = EntropyBalance(2, lr=temperature_lr, t_min=1.0, t_max=t_max)
    recipe.name = "bmtard"
    return recipe


@register("baseline", "Fig. 2 ablation 'Baseline': distillation from the adversarial teacher alone", ("adv",),
          epochs=300, milestones=(215, 260, 285))
def baseline(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *,
             num_classes: int = 10, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
             reduction: Reduction = "mean", start: str = "normal") -> Recipe:
    """KL(T_adv(x_adv) || S(x_adv)), MTARD's adversarial branch with weight 1."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    branch = Branch(training_pgd(eps, alpha, steps, start=start), KLDistill(1.0, reduction), teacher=adv, name="adv")
    return Recipe(as_student(student, num_classes), [branch], name="baseline")


@register("baseline_mt", "Fig. 2 ablation 'Baseline+MT': both teachers, fixed weights 1/2, 1/2",
          ("adv", "nat"), epochs=300, milestones=(215, 260, 285))
def baseline_mt(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
                nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
                alpha: float = 2 / 255, steps: int = 10, reduction: Reduction = "mean",
                start: str = "normal") -> Recipe:
    """MTARD's two branches with constant weights (no ANL)."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, 1.0, reduction, start)
    return Recipe(as_student(student, num_classes), branches, Fixed([0.5, 0.5]), name="baseline_mt")


PRESETS["baseline_mt_anl"] = PresetInfo(mtard, "Fig. 2 ablation 'Baseline+MT+ANL' (= mtard)", ("adv", "nat"),
                                        PRESETS["mtard"].schedule)


@register("mtard3", "MTARD with a third, L2-robust teacher on L2-PGD inputs (N = 3), ANL over three losses",
          ("adv", "nat", "l2"), epochs=300, milestones=(215, 260, 285))
def mtard3(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
           nat_teacher: ModelLike | None = None, l2_teacher: ModelLike | None = None, *, num_classes: int = 10,
           eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, l2_eps: float = 0.5,
           l2_alpha: float = 0.1, beta: float = 1.0, rw: float = 0.025, weighter: str = "anl",
           reduction: Reduction = "mean") -> Recipe:
    """MTARD's two branches plus KL(T_l2(x_l2) || S(x_l2)), x_l2 an L2 PGD example (eps 0.5, step 0.1) against
    the student: robustness to a second threat model from a teacher trained for it; ANL(3) balances them."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    l2 = as_teacher(l2_teacher, num_classes, "l2")
    branches = _two_teacher_branches(adv, nat, eps, alpha, steps, 1.0, reduction)
    branches.append(Branch(training_pgd(l2_eps, l2_alpha, steps, norm="L2"), KLDistill(1.0, reduction), teacher=l2,
                           name="l2"))
    w = ANL(3, beta, rw) if weighter == "anl" else make_weighter(weighter, 3)
    return Recipe(as_student(student, num_classes), branches, w, name="mtard3")


def multi_teacher(student: ModelLike, teachers: Sequence[tuple[InputTransform, ModelLike]],
                  weighter: Weighter | None = None, *, num_classes: int = 10, temperature: float = 1.0,
                  reduction: Reduction = "mean") -> Recipe:
    """N teachers, each reading its own input transform, KL to each, balanced by ANL unless told otherwise."""
    branches = [
        Branch(t, KLDistill(temperature, reduction), teacher=as_teacher(m, num_classes, f"teacher{i}"),
               name=getattr(m, "name", f"teacher{i}"))
        for i, (t, m) in enumerate(teachers)
    ]
    return Recipe(as_student(student, num_classes), branches, weighter or ANL(len(branches)), name="multi_teacher")


__all__ = ["PRESETS", "Branch", "PresetInfo", "ard", "baseline", "baseline_mt", "bmtard", "get_preset",
           "mtard", "mtard3", "multi_teacher", "natural", "rslad", "sat", "trades", "training_pgd"]
