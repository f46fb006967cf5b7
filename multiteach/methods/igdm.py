"""IGDM (Lee, Cho & Kim, ICLR 2025): the Indirect Gradient Distillation Module, an add-on to any adversarial
distillation. With d = x' - x, the perturbation of the base method's adversarial example x', the student matches
the teacher's output *difference* across the perturbation, which by a first-order Taylor expansion is
2 <grad_x f(x), d>: the input gradients are matched without computing them.

    L_IGDM = alpha * (e / E) * KL( softmax(T(x + beta d) - T(x - gamma d)) || softmax(S(x + beta d) - S(x - gamma d)) )

summed over classes per sample and averaged over the batch (nn.KLDivLoss(reduction="batchmean")), T = 1, the
teacher's difference a constant; e is the epoch counted from 1, E = 200; beta = gamma = 1; x - gamma d is not
clamped to [0, 1].

The term needs two student forwards (x + beta d and x - gamma d, separately, in train mode, as the code) and two
teacher forwards on inputs derived from another branch's x'. A branch sees one student output and one target,
so the pieces are: :class:`Recorded` keeps the base attack's x' for the batch; :class:`Offset` builds x + s d
from it; the IGDM branch reads S(x + beta d) as its student output and S(x - gamma d) as its target
(``teacher=STUDENT``: both differentiable); :class:`IGDMLoss` runs the frozen teacher on the two inputs itself;
:class:`EpochRamp` weighs the branch alpha (e + 1) / E (``e = ctx.epoch`` counts finished epochs).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..losses import KLDistill, kl_per_sample
from ..recipe import STUDENT, Branch, Recipe
from ..teachers import Teacher
from ..transforms import PGD, Clean, InputTransform, WrappedTransform
from ..weighting import Fixed, StepContext, Weighter
from ._common import ModelLike, as_student, as_teacher, register

IGDM_SCHEDULE = {"epochs": 200, "milestones": (100, 150)}


class Recorded(WrappedTransform):
    """``base``'s output, also kept (with the clean batch it was made from) for :class:`Offset` to read in the
    same step. Reading or setting the contract attributes (``model``, ``reference``, ``through``, ...) reads or
    sets ``base``'s, so the recipe registers the teachers ``base`` reads. Not graph-safe (the kept tensor is a
    side output a recorded graph would not refresh); ``base`` runs without autocast, as the official fp32 code."""

    graph_safe = False

    def __init__(self, base: InputTransform) -> None:
        if isinstance(base, Clean | Recorded):
            raise ValueError(f"Recorded wraps an adversarial transform, got {base!r}")
        super().__init__(base)
        self.__dict__.update(clean=None, last=None)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out = self.inner(model, x, y, reference)
        self.__dict__.update(clean=x, last=out)
        return out

    def adversarial(self, x: Tensor) -> Tensor:
        """The x' made from the batch ``x`` in this step."""
        if self.clean is not x:
            raise RuntimeError("IGDM reads the adversarial example of the batch in hand: the branch using "
                               f"{self.inner!r} must come before the IGDM branch in the same recipe")
        return self.last

    def __repr__(self) -> str:
        return f"Recorded({self.inner!r})"


class Offset(InputTransform):
    """x + scale * (x' - x), with x' what ``source`` made from this batch: IGDM's x + beta d (scale = beta) and
    x - gamma d (scale = -gamma), not clamped to [0, 1], as the code. ``through`` is the teacher
    :class:`IGDMLoss` reads on this input (set here, the recipe registers it with the other teachers)."""

    graph_safe = False

    def __init__(self, source: Recorded, scale: float, teacher: nn.Module | None = None) -> None:
        self.source, self.scale, self.through = source, float(scale), teacher
        self.last: Tensor | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        x_adv = self.source.adversarial(x)
        self.last = (x + self.scale * (x_adv - x)).detach()
        return self.last

    def __repr__(self) -> str:
        return f"Offset({self.scale:+g} d)"


class IGDMLoss(nn.Module):
    """KL(softmax(T(x+) - T(x-)) || softmax(S(x+) - S(x-))) per sample (summed over classes: batchmean).

    ``student_out`` is S(x+) (the branch's transform ``plus``), ``target_out`` S(x-) (``teacher=STUDENT`` on
    ``teacher_input=minus``): both differentiable, each its own train-mode forward. The teacher (``minus.through``)
    runs here on the two inputs the transforms made this step, without gradient."""

    def __init__(self, plus: Recorded | Offset, minus: Offset) -> None:
        super().__init__()
        if minus.through is None:
            raise ValueError("IGDMLoss reads its teacher from the minus transform: Offset(source, -gamma, teacher)")
        self.plus, self.minus = plus, minus

    def forward(self, student_plus: Tensor, student_minus: Tensor | None, y: Tensor) -> Tensor:
        if student_minus is None or self.plus.last is None or self.minus.last is None:
            raise ValueError("IGDMLoss is a branch with transform=plus, teacher=STUDENT, teacher_input=minus")
        teacher = self.minus.through
        with torch.no_grad():
            t_diff = teacher(self.plus.last) - teacher(self.minus.last)
        return kl_per_sample(student_plus.float() - student_minus.float(), t_diff.float(), 1.0, "batchmean")

    def extra_repr(self) -> str:
        return f"plus={self.plus!r}, minus={self.minus!r}"


class EpochRamp(Weighter):
    """Branch ``index`` weighed ``alpha * (epoch + 1) / epochs`` (IGDM's ramp: the code's epoch counts from 1,
    ``ctx.epoch`` counts finished epochs; not capped at 1 past ``epochs``, as the code), times what ``inner``
    gives it. ``inner`` weighs all ``n`` branches, or the ``n - 1`` others (the ramped branch is then inserted
    at ``index`` with weight 1 times the ramp: :func:`with_igdm` on any recipe's weighter)."""

    def __init__(self, inner: Weighter, n: int, index: int, alpha: float, epochs: int) -> None:
        super().__init__(n)
        if inner.n not in (n, n - 1):
            raise ValueError(f"EpochRamp wraps a weighter for {n} or {n - 1} branches, got one for {inner.n}")
        if not 0 <= index < n:
            raise ValueError(f"index {index} is not a branch index (0..{n - 1})")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if type(inner).combine is not Weighter.combine:
            raise ValueError(f"{type(inner).__name__} is not a weighted sum (it overrides combine): it cannot be "
                             "ramped")
        self.inner, self.index, self.alpha, self.epochs = inner, index, float(alpha), int(epochs)

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return self.inner.differentiable

    def ramp(self, epoch: int) -> float:
        return self.alpha * (epoch + 1) / self.epochs

    def weigh(self, ctx: StepContext) -> Tensor:
        if self.inner.n == self.n:
            w = self.inner.weigh(ctx).to(ctx.losses.device, torch.float32).clone()
            w[self.index] = w[self.index] * self.ramp(ctx.epoch)
            return w
        keep = [i for i in range(self.n) if i != self.index]
        sub = StepContext(ctx.losses[keep], ctx.y, [ctx.student[i] for i in keep] if ctx.student else [],
                          [ctx.targets[i] for i in keep] if ctx.targets else [], ctx.epoch, ctx.sync)
        w = self.inner.weigh(sub).to(ctx.losses.device, torch.float32)
        row = torch.full((1, *w.shape[1:]), self.ramp(ctx.epoch), device=w.device)
        return torch.cat([w[:self.index], row, w[self.index:]])

    def on_lr(self, ratio: float) -> None:
        self.inner.on_lr(ratio)

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()

    def extra_repr(self) -> str:
        return f"index={self.index}, alpha={self.alpha}, epochs={self.epochs}"


def igdm_branch(teacher: nn.Module, source: Recorded, *, beta: float = 1.0, gamma: float = 1.0,
                share_adversarial: bool = False, name: str = "igdm") -> Branch:
    """The IGDM term as a branch (weight it with :class:`EpochRamp`): student S(x + beta d), target S(x - gamma d),
    d = x' - x from ``source``. ``share_adversarial``: x + d is x' itself and its student forward the adversarial
    branch's (SAAD's code; needs beta = 1) instead of a forward of x + beta d of its own (IGDM's code)."""
    if share_adversarial and beta != 1.0:
        raise ValueError("share_adversarial reads x' itself: it needs beta = 1")
    plus: Recorded | Offset = source if share_adversarial else Offset(source, beta)
    minus = Offset(source, -gamma, teacher)
    return Branch(plus, IGDMLoss(plus, minus), teacher=STUDENT, teacher_input=minus, name=name)


def _adversarial(recipe: Recipe) -> tuple[Branch, InputTransform]:
    for b in recipe.branches:
        if not isinstance(b.transform, Clean):
            return b, b.transform
    raise ValueError(f"recipe {recipe.name!r} has no adversarial branch: IGDM needs an x' to take d = x' - x from")


def with_igdm(recipe: Recipe, teacher: nn.Module | None = None, *, alpha: float = 20.0, epochs: int = 200,
              beta: float = 1.0, gamma: float = 1.0) -> Recipe:
    """``recipe`` plus the IGDM term: d = x' - x from its first adversarial branch's transform (wrapped in
    :class:`Recorded` wherever the recipe uses it), the IGDM branch appended last, and the recipe's weighter
    extended to it with the ramp alpha (e + 1) / epochs. ``teacher``: default the adversarial branch's teacher
    (or the module its attack reads). A new Recipe sharing the student, teachers, losses and weighter."""
    first, attack = _adversarial(recipe)
    if teacher is None:
        teacher = next((m for m in (first.teacher, attack.through, attack.reference) if isinstance(m, Teacher)),
                       None)
        if teacher is None:
            raise ValueError(f"recipe {recipe.name!r}: name the teacher IGDM distils from (teacher=...)")
    source = attack if isinstance(attack, Recorded) else Recorded(attack)

    def swap(t: InputTransform | None) -> InputTransform | None:
        return source if t is attack else t

    branches = [dataclasses.replace(b, transform=swap(b.transform), teacher_input=swap(b.teacher_input))
                for b in recipe.branches]
    branches.append(igdm_branch(teacher, source, beta=beta, gamma=gamma))
    n = len(branches)
    return Recipe(recipe.student, branches, EpochRamp(recipe.weighter, n, n - 1, alpha, epochs),
                  balance=recipe.balance, name=f"{recipe.name}+igdm")


@register("igdm", "AdaAD + IGDM, Lee et al. 2025: KL(T(x')||S(x')) + alpha (e/E) KL(T(x+d)-T(x-d) || S(x+d)-S(x-d))",
          ("adv",), **IGDM_SCHEDULE)
def igdm(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
         eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, igdm_alpha: float = 20.0, epochs: int = 200,
         beta: float = 1.0, gamma: float = 1.0, alpha_kd: float = 1.0) -> Recipe:
    """AdaAD + IGDM as the authors' release runs it (``adaad_IGDM_cifar100.py``, its recommended script,
    ``--alpha 20 --beta 1 --gamma 1``; the release has CIFAR-100 scripts only): x' is AdaAD's attack, PGD-10,
    step 2/255 in the 8/255 ball, from x + 0.001*N(0,1), student in eval mode, ascending KL(T(x') || S(x'))
    summed through the teacher; d = x' - x;

        L = alpha_kd KL(T(x') || S(x')) + (1 - alpha_kd) KL(T(x) || S(x))
            + igdm_alpha * (e / 200) * KL(T(x+beta d) - T(x-gamma d) || S(x+beta d) - S(x-gamma d))

    every KL at T = 1, per-sample sum over classes averaged over the batch (batchmean, the code's
    ``(1/len) * sum`` and KLDivLoss(reduction="batchmean")), alpha_kd = 1 (the clean term has weight 0 but is
    forwarded, as the code's S(x), which moves the BatchNorm running statistics). The ramp's E is ``epochs``
    (the code writes 200 whatever its epoch count). S(x + beta d) is its own forward, as the code, not the
    adversarial branch's S(x'). Forward order: the code runs S(x+d), S(x), S(x-d), S(x'); here S(x'), S(x),
    S(x+d), S(x-d) (the same gradients; only the BN running averages see another order). As the library's PGD,
    the start x + 0.001 N is clamped to [0, 1] (the code clamps from the first step on). Schedule: 200 epochs,
    SGD 0.1, momentum 0.9, weight decay 2e-4, batch 128, x0.1 after epochs 100 and 150. Teacher: BDM
    (Wang2023Better_WRN-28-10, RobustBench) on CIFAR-100. :func:`with_igdm` adds the term to any other preset."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    source = Recorded(PGD(eps=eps, alpha=alpha, steps=steps, start="normal", objective="kl", bn_mode="eval",
                          through=teacher))
    branches = [
        Branch(source, KLDistill(1.0, "batchmean"), teacher=teacher, name="adv_kl"),
        Branch(Clean(), KLDistill(1.0, "batchmean"), teacher=teacher, name="nat_kl"),
        igdm_branch(teacher, source, beta=beta, gamma=gamma),
    ]
    weighter = EpochRamp(Fixed([alpha_kd, 1.0 - alpha_kd]), 3, 2, igdm_alpha, epochs)
    return Recipe(as_student(student, num_classes), branches, weighter, name="igdm")


__all__ = ["EpochRamp", "IGDMLoss", "Offset", "Recorded", "igdm", "igdm_branch", "with_igdm"]
