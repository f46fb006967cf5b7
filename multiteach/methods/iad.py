"""IAD (Zhu et al., ICLR 2022): introspective adversarial distillation. The student trusts the teacher's soft
label on x' in proportion to a_i = p_T(y_i | x'_i)^beta and, for the rest, its own clean output:

    L = alpha tau^2 KL(T/tau || S(x')/tau) + alpha (1 - a_i) KL(S(x) || S(x')) + (1 - alpha) CE(S(x), y)

with the self-introspection term switched on after a warm-up of ``begin`` epochs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import CrossEntropy, KLDistill
from ..recipe import STUDENT, Branch, Recipe
from ..registry import WEIGHTERS
from ..transforms import PGD, Clean
from ..weighting import StepContext, Weighter
from ._common import ModelLike, as_student, as_teacher, register


def teacher_trust(teacher_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """a_i = p_T(y_i | x_i)^beta, the teacher's probability of the true label (T = 1), per sample, (B,)."""
    p = F.softmax(teacher_logits.detach().float(), dim=1)
    return p.gather(1, y.view(-1, 1)).squeeze(1).pow(beta)


class TeacherTrust(nn.Module):
    """A probe, not a loss: the branch's per-sample value is the trust a_i = p_T(y | x')^beta of its teacher's
    output (detached). Given weight 0, it only makes the teacher's output on x' a target the weighter can read
    (IAD-I distils from the teacher's clean output but trusts it by its output on x'); the logs show its batch
    mean, the teacher's average trust."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        if teacher_logits is None:
            raise ValueError("TeacherTrust needs a teacher on its branch")
        return teacher_trust(teacher_logits, y, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@WEIGHTERS.register("iad")
class Introspection(Weighter):
    """IAD's per-sample weights: fixed branch weights ``weights``, except the ``introspection`` branch's, which
    is ``weights[introspection] * (1 - a_i)`` from epoch ``begin`` on (0 before), with
    a_i = p_T(y_i | x'_i)^beta read from the target of branch ``trust_from`` (the teacher's logits on x')."""

    def __init__(self, n: int, weights: Sequence[float], introspection: int, trust_from: int, beta: float = 0.1,
                 begin: int = 60) -> None:
        super().__init__(n)
        if len(weights) != n:
            raise ValueError(f"Introspection has {len(weights)} weights for {n} branches")
        for name, i in (("introspection", introspection), ("trust_from", trust_from)):
            if not 0 <= i < n:
                raise ValueError(f"{name} = {i} is not a branch index (0..{n - 1})")
        if beta < 0:
            raise ValueError(f"IAD beta must be >= 0, got {beta}")
        self.introspection, self.trust_from, self.beta, self.begin = introspection, trust_from, float(beta), begin
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]))

    def weigh(self, ctx: StepContext) -> Tensor:
        w = self.weights.to(ctx.losses.device).view(-1, 1).repeat(1, ctx.losses.shape[1])
        if ctx.epoch < self.begin:
            w[self.introspection] = 0.0
            return w
        target = ctx.targets[self.trust_from]
        if target is None:
            raise ValueError(f"branch {self.trust_from} has no teacher output to trust")
        w[self.introspection] *= 1.0 - teacher_trust(target, ctx.y, self.beta).to(w.device)
        return w

    def extra_repr(self) -> str:
        return (f"weights={[round(w, 6) for w in self.weights.tolist()]}, introspection={self.introspection}, "
                f"trust_from={self.trust_from}, beta={self.beta}, begin={self.begin}")


@register("iad", "IAD-I, Zhu et al. 2022: ARD's KL + (1 - a_i) KL(S(x) || S(x_adv)), a_i = p_T(y|x_adv)^0.1",
          ("adv",), epochs=200, milestones=(100,))
def iad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
        temperature: float = 1.0, alpha_kd: float = 1.0, beta: float = 0.1, begin: int = 60, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10) -> Recipe:
    """IAD-I (ZFancy/IAD, ``IAD-I.py``, built on ARD): PGD-10 against the student, CE summed, step 2/255,
    uniform start, student in train mode; the teacher reads the clean batch.

        L = alpha tau^2 KL(T(x)/tau || S(x')/tau) + alpha mean_i (1 - a_i) KL(S(x)_i || S(x')_i)
            + (1 - alpha) CE(S(x), y),      a_i = p_T(y_i | x'_i)^beta

    tau = 1, alpha = 1 (the CE term has weight 0), beta = 0.1; the introspection term joins from epoch 60
    (0-based, ``begin``). Every KL is per-sample summed and averaged over the batch (batchmean); S(x) in the
    introspection term is not detached; a_i is a constant. As the code: the trust a_i reads the teacher's
    output on x' while its distillation target is its clean output T(x) (ARD's), and only the introspection
    term is reweighted (IAD-II, the AKD2-based script with a second, natural teacher, also weighs the teacher
    term by a_i, reads the teacher on x' and starts at epoch 40; it is not this preset). The branch ``trust``
    (weight 0) makes T(x') available to the weighter and logs the mean trust. Schedule as the code runs it:
    200 epochs, SGD 0.1, momentum 0.9, weight decay 2e-4, batch 128; its ``--lr_schedule 100 150`` sets the
    LR from the initial one at each milestone, so it is 0.01 from epoch 100 to the end (one decay)."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start="uniform", bn_mode="train")
    branches = [
        Branch(pgd, KLDistill(temperature, "batchmean", temperature_squared=True), teacher=teacher,
               teacher_input=Clean(), name="adv_kd"),
        Branch(pgd, KLDistill(1.0, "batchmean"), teacher=STUDENT, teacher_input=Clean(), name="introspection"),
        Branch(Clean(), CrossEntropy(), name="clean_ce"),
        Branch(pgd, TeacherTrust(beta), teacher=teacher, name="trust"),
    ]
    weighter = Introspection(4, [alpha_kd, alpha_kd, 1.0 - alpha_kd, 0.0], introspection=1, trust_from=3, beta=beta,
                             begin=begin)
    return Recipe(as_student(student, num_classes), branches, weighter, name="iad")


__all__ = ["Introspection", "TeacherTrust", "iad", "teacher_trust"]
