"""Fair-ARD (Yue et al., NeurIPS 2023): per-class weights from the classes' adversarial difficulty, the number
of PGD steps their samples stay correctly classified, on ARD, RSLAD or MTARD (Fair-RSLAD, Fair-MTARD)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..losses import CrossEntropy, KLDistill
from ..recipe import Branch, Recipe, epoch_sum
from ..transforms import PGD, Clean
from ..weighting import Fixed, StepContext, Weighter
from ._common import ModelLike, WeighterSpec, as_student, as_teacher, check_unused, register, weighter_for

Base = Literal["ard", "rslad", "mtard"]
RSLAD_SCHEDULE = {"epochs": 300, "milestones": (215, 260, 285)}


class SurvivalPGD(PGD):
    """PGD that also counts, per sample, the iterations whose starting point the attacked model still
    classifies correctly (Fair-ARD's kappa, 0..steps): before each of the ``steps`` gradient steps the
    prediction on the current point is compared to the label (the final point is not checked), with the
    model in the attack's ``bn_mode``. The counts of the last call are left in ``survived`` (long, (B,)).

    Not graph-safe: the counts are a side output a recorded graph would not refresh.
    """

    graph_safe = False
    survived: Tensor | None = None

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        self._count = torch.zeros(len(y), dtype=torch.long, device=x.device)
        x_adv = super().perturb(model, x, y, reference)
        self.survived = self._count
        return x_adv

    def observe(self, logits: Tensor, y: Tensor) -> None:
        self._count += logits.argmax(1) == y


class ClassDifficultyWeights(Weighter):
    """Fair-ARD's per-class weights times the base recipe's weights: ``W_ib = base_i * w_{y_b}``.

    Over an epoch it sums the attack's per-sample counts kappa per class and counts the samples; at its end
    (sums over DDP ranks with :func:`epoch_sum`), with K_c the class's summed kappa over (samples seen / C),
    the mean kappa per sample of a balanced class, as the code divides by len(dataset) / C:

        w_c = (1 / (K_c + eps))^beta,   w <- w * C / sum_c w_c,   w <- clip(w, w_min, w_max)

    (no normalisation after the clip). The weights start at 1. ``base`` (Fixed for ARD/RSLAD, ANL for MTARD)
    sees the class-weighted per-sample losses, as Fair-MTARD's ANL reads the reweighted KL terms.
    """

    def __init__(self, attack: SurvivalPGD, base: Weighter, num_classes: int = 10, beta: float = 2.0,
                 w_min: float = 5 / 6, w_max: float = 5 / 2, eps: float = 1e-5) -> None:
        super().__init__(base.n)
        if not 0 < w_min <= w_max:
            raise ValueError(f"weight bounds need 0 < w_min <= w_max, got {w_min}, {w_max}")
        self.attack, self.base = attack, base
        self.num_classes, self.beta, self.w_min, self.w_max, self.eps = num_classes, float(beta), w_min, w_max, eps
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.register_buffer("survived", torch.zeros(num_classes, dtype=torch.long))  # this epoch's kappa sums
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # this epoch's samples

    def weigh(self, ctx: StepContext) -> Tensor:
        kappa = self.attack.survived
        if kappa is None or kappa.shape != ctx.y.shape:
            raise RuntimeError("ClassDifficultyWeights reads the counts of its SurvivalPGD's call on this batch: "
                               "the attack must be a branch's transform in the same recipe")
        self.survived.index_add_(0, ctx.y, kappa.to(self.survived.device))
        self.seen += len(ctx.y)
        w = self.class_weights[ctx.y]
        base = self.base.weigh(dataclasses.replace(ctx, losses=ctx.losses * w, _batch=None))
        return (base if base.dim() == 2 else base[:, None]) * w

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return self.base.differentiable

    def on_lr(self, ratio: float) -> None:
        self.base.on_lr(ratio)

    @torch.no_grad()
    def on_epoch_end(self) -> None:
        self.base.on_epoch_end()
        kappa = epoch_sum(self.survived).double() / (epoch_sum(self.seen).double() / self.num_classes)
        w = (1.0 / (kappa + self.eps)) ** self.beta
        w = (w * self.num_classes / w.sum()).clamp(self.w_min, self.w_max)
        self.class_weights.copy_(torch.where(torch.isfinite(w).all(), w, self.class_weights.double()))
        self.survived.zero_()
        self.seen.zero_()

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, beta={self.beta}, clip=[{self.w_min:.4g}, {self.w_max:.4g}]"


@register("fair_ard", "Fair-ARD, Yue et al. 2023: ARD with per-class weights (1/kappa_c)^beta from the PGD "
          "steps each class survives", ("adv",), epochs=200, milestones=(100,))
def fair_ard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
             nat_teacher: ModelLike | None = None, *, num_classes: int = 10, base: Base = "ard", beta: float = 2.0,
             eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, temperature: float = 30.0,
             alpha_kd: float = 1.0) -> Recipe:
    """Fair-ARD (NISP-official/Fair-ARD, Fair-ARD.py), on ARD: PGD-10 (step 2/255, eps 8/255, uniform start,
    CE, student in train mode) counts per sample kappa, the steps whose starting point is still classified
    correctly; loss mean_b w_{y_b} [alpha T^2 KL(T(x)/T || S(x')/T) / C + (1 - alpha) CE(S(x), y)], T = 30,
    alpha = 1; after each epoch w_c = (1/(kappa_c + 1e-5))^2 scaled to sum C, clipped to [5/6, 5/2], kappa_c
    the class's kappa summed over the epoch / (samples / C); w = 1 in the first epoch. Schedule: 200
    epochs, SGD lr 0.1, momentum 0.9, Nesterov, weight decay 2e-4; its ``adjust_learning_rate`` restarts from
    the argument each time, so the LR is 0.1 then 0.01 from epoch 100 to the end (one milestone, 100; the
    flag says 100, 150). ``base="rslad"`` / ``"mtard"`` build :func:`fair_rslad` / :func:`fair_mtard` (as
    presets in a config: their schedules are 300 epochs and Fair-MTARD takes the ``nat`` teacher)."""
    if base != "ard":
        if (temperature, alpha_kd) != (30.0, 1.0):
            raise ValueError(f"temperature and alpha_kd are ARD's options; base is {base!r}")
        if base == "rslad":
            return fair_rslad(student, adv_teacher, num_classes=num_classes, beta=beta, eps=eps, alpha=alpha,
                              steps=steps)
        return fair_mtard(student, adv_teacher, nat_teacher, num_classes=num_classes, beta=beta, eps=eps,
                          alpha=alpha, steps=steps)
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = SurvivalPGD(eps=eps, alpha=alpha, steps=steps, start="uniform", bn_mode="train")
    branches = [Branch(pgd, KLDistill(temperature, "mean", temperature_squared=True), teacher=teacher,
                       teacher_input=Clean(), name="adv_kd")]
    weights = [alpha_kd]
    if alpha_kd < 1.0:
        branches.append(Branch(Clean(), CrossEntropy(), name="clean_ce"))
        weights.append(1.0 - alpha_kd)
    return Recipe(as_student(student, num_classes), branches,
                  ClassDifficultyWeights(pgd, Fixed(weights), num_classes, beta), name="fair_ard")


@register("fair_rslad", "Fair-RSLAD, Yue et al. 2023: RSLAD with Fair-ARD's per-class difficulty weights",
          ("adv",), **RSLAD_SCHEDULE)
def fair_rslad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *,
               num_classes: int = 10, beta: float = 2.0, eps: float = 8 / 255, alpha: float = 2 / 255,
               steps: int = 10) -> Recipe:
    """Fair-RSLAD (NISP-official/Fair-ARD, Fair-RSLAD.py): RSLAD's attack (KL to the teacher's clean output,
    from x + 0.001*N(0,1), student in eval mode; kappa counted there) and terms, each sample's weighted by its
    class's w: mean_b w_{y_b} [5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x))] / C; w as in :func:`fair_ard`,
    updated after each epoch. Schedule: 300 epochs, LR x0.1 after 215, 260, 285, SGD momentum 0.9, Nesterov,
    weight decay 2e-4. Its code writes (1/kappa)^beta without the 1e-5 of the other two scripts (a class
    that never survives a step would make every weight NaN); we keep the 1e-5 (a change < 1e-5 otherwise)."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = SurvivalPGD(eps=eps, alpha=alpha, steps=steps, start="normal", objective="kl", reference=teacher)
    branches = [
        Branch(pgd, KLDistill(), teacher=teacher, teacher_input=Clean(), name="adv_kl"),
        Branch(Clean(), KLDistill(), teacher=teacher, name="nat_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches,
                  ClassDifficultyWeights(pgd, Fixed([5 / 6, 1 / 6]), num_classes, beta), name="fair_rslad")


@register("fair_mtard", "Fair-MTARD, Yue et al. 2023: MTARD with Fair-ARD's per-class difficulty weights",
          ("adv", "nat"), **RSLAD_SCHEDULE)
def fair_mtard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
               nat_teacher: ModelLike | None = None, *, num_classes: int = 10, beta: float = 2.0,
               eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, rw: float = 0.025,
               nat_target: Literal["adv_teacher", "nat_teacher"] = "adv_teacher",
               weighter: WeighterSpec = "anl") -> Recipe:
    """Fair-MTARD (NISP-official/Fair-ARD, Fair-MTARD.py): MTARD's attack (CE, x + 0.001*N(0,1), student in
    eval mode; kappa counted there), KL averaged over batch x classes, each sample's term weighted by its
    class's w (as :func:`fair_ard`, updated after each epoch), and ANL (beta 1, r_w = 0.025 decayed with the
    LR, w0 = 1/2) on the *reweighted* batch losses. Its code distils the student's clean output from the
    adversarial teacher's output on the PGD example, KL(T_adv(x') || S(x)), and never uses the natural
    teacher's (computed, unused): ``nat_target="adv_teacher"`` (default) follows the code; ``"nat_teacher"``
    is MTARD's KL(T_nat(x) || S(x)). Schedule: 300 epochs, LR x0.1 after 215, 260, 285, SGD momentum 0.9,
    Nesterov, weight decay 2e-4. ``weighter`` swaps ANL for any registered weighter (the class weights
    multiply its weights)."""
    check_unused(weighter, "anl", rw=(rw, 0.025))
    adv = as_teacher(adv_teacher, num_classes, "adv")
    pgd = SurvivalPGD(eps=eps, alpha=alpha, steps=steps, start="normal")
    if nat_target == "nat_teacher":
        nat_branch = Branch(Clean(), KLDistill(), teacher=as_teacher(nat_teacher, num_classes, "nat"), name="nat")
    else:
        nat_branch = Branch(Clean(), KLDistill(), teacher=adv, teacher_input=pgd, name="nat")
    branches = [Branch(pgd, KLDistill(), teacher=adv, name="adv"), nat_branch]
    base = weighter_for(weighter, 2, "anl", beta=1.0, rw=rw, w0=[0.5, 0.5])
    return Recipe(as_student(student, num_classes), branches, ClassDifficultyWeights(pgd, base, num_classes, beta),
                  name="fair_mtard")


__all__ = ["ClassDifficultyWeights", "SurvivalPGD", "fair_ard", "fair_mtard", "fair_rslad"]
