"""DGAD (Park & Min, ECCV 2024): dynamic guidance adversarial distillation. Each sample is distilled on one
input only, chosen by whether the teacher gets its clean image right (misclassification-aware partitioning,
MAP): on x where it does not, on x' where it does. The teacher's logits are corrected where they are wrong
(error-corrective label swapping, ELS), and the student's outputs on x and x' are pulled together (predictive
consistency regularisation, PCR):

    lambda_i = [argmax T(x_i) != y_i]
    L = mean_i [ lambda_i KL_i(els(T(x)) || S(x)) + (1 - lambda_i) KL_i(els(T(x')) || S(x')) ]
        + beta_pcr mean_{i,c} (softmax(S(x'))_ic - softmax(S(x))_ic)^2

els(z): where the true-class logit is below the largest other one, the two are swapped."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import kl_per_sample
from ..recipe import STUDENT, Branch, Recipe
from ..registry import WEIGHTERS
from ..transforms import Clean
from ..weighting import StepContext, Weighter
from ._common import ModelLike, as_student, as_teacher, register, training_pgd


def swap_true_and_top(logits: Tensor, y: Tensor) -> Tensor:
    """ELS: where z_y < max_{j != y} z_j, exchange z_y and that largest other logit (first index on ties).

    The code writes two rules, argmax(z) != y with the argmax for clean inputs and z_y < max_{j != y} z_j for
    adversarial ones; they give the same logits (on a tie the swapped values are equal)."""
    true = logits.gather(1, y.view(-1, 1))
    top, top_idx = logits.scatter(1, y.view(-1, 1), float("-inf")).max(1, keepdim=True)
    wrong = true < top
    out = logits.clone()
    out.scatter_(1, y.view(-1, 1), torch.where(wrong, top, true))
    return out.scatter(1, top_idx, torch.where(wrong, true, top))


class LabelSwappedKL(nn.Module):
    """KL(softmax(els(T)) || softmax(S)) per sample, summed over classes (the code's KLDivLoss(reduction=
    "none").sum(1)), T = 1, the corrected teacher logits a constant."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        if teacher_logits is None:
            raise ValueError("LabelSwappedKL needs a teacher on its branch")
        return kl_per_sample(student_logits, swap_true_and_top(teacher_logits.detach().float(), y), 1.0, "batchmean")


class ConsistencyMSE(nn.Module):
    """PCR: mean over classes of (softmax(S(x')) - softmax(S(x)))^2 per sample (nn.MSELoss's mean over batch x
    classes); with ``teacher=STUDENT`` both outputs keep their gradient, as the code."""

    def forward(self, student_logits: Tensor, target_logits: Tensor | None, y: Tensor) -> Tensor:
        if target_logits is None:
            raise ValueError("ConsistencyMSE compares two outputs: give its branch teacher=STUDENT")
        p, q = F.softmax(student_logits.float(), 1), F.softmax(target_logits.float(), 1)
        return (p - q).pow(2).mean(1)


@WEIGHTERS.register("dgad")
class TeacherMistakeSplit(Weighter):
    """MAP: per sample, branch ``clean`` weighs lambda_i = [argmax T(x_i) != y_i] (the target of that branch,
    the teacher's clean logits), branch ``adv`` 1 - lambda_i, any other branch ``weights[k]`` (default 1).
    With every sample in one group the other term is 0 (the code divides 0 by 0 there)."""

    def __init__(self, n: int, clean: int = 0, adv: int = 1, weights: Sequence[float] | None = None) -> None:
        super().__init__(n)
        if clean == adv or not (0 <= clean < n and 0 <= adv < n):
            raise ValueError(f"clean = {clean} and adv = {adv} must be two branch indices (0..{n - 1})")
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"TeacherMistakeSplit has {len(weights)} weights for {n} branches")
        self.clean, self.adv = clean, adv
        self.register_buffer("weights", torch.tensor(weights))

    def weigh(self, ctx: StepContext) -> Tensor:
        target = ctx.targets[self.clean] if ctx.targets else None
        if target is None:
            raise ValueError(f"branch {self.clean} has no teacher output to split the batch by")
        wrong = (target.argmax(1) != ctx.y).float()
        w = self.weights.to(wrong.device).view(-1, 1).repeat(1, len(wrong))
        w[self.clean], w[self.adv] = wrong, 1.0 - wrong
        return w

    def extra_repr(self) -> str:
        return f"clean={self.clean}, adv={self.adv}"


@register("dgad", "DGAD, Park & Min 2024: KL on x where the teacher errs on x, else on x', label-swapped teacher, "
          "+ MSE(S(x'), S(x))", ("adv",), epochs=200, milestones=(100, 150))
def dgad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
         eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, pcr_weight: float = 1.0) -> Recipe:
    """DGAD (kunsaram01/DGAD, ``main.py --method DGAD``): x' is AdaAD's attack (``AT_helper.adaad_inner_loss``):
    PGD-10, step 2/255, eps 8/255, from x + 0.001*N(0,1), student in eval mode, ascending KL(T(x') || S(x'))
    summed, through the teacher. With lambda_i = [argmax T(x_i) != y_i] (MAP),

        L = (n/B) loss_clean + ((B-n)/B) loss_adv + pcr_weight * MSE(softmax S(x'), softmax S(x))
          = mean_i [lambda_i KL_i(els T(x) || S(x)) + (1 - lambda_i) KL_i(els T(x') || S(x'))] + pcr_weight PCR

    (n = sum lambda; loss_clean, loss_adv are the KLs averaged over their own groups), each KL summed over
    classes at T = 1, the teacher's logits corrected by ELS on both inputs and detached; the MSE averages over
    batch x classes with gradients through both student outputs; pcr_weight (``--ALP_beta``, ``--alp on``) = 1;
    every dataset alike. The code scales by its ``--bs`` (128) rather than the batch in hand (the last, partial
    batch of an epoch weighs less there); MobileNetV2 runs a mis-parenthesised 0.5 (...) variant, not this one.
    Forwards as the code: S(x), S(x') in train mode, both shared by their KL and the MSE. As the library's PGD,
    the start is clamped to [0, 1] (the code clamps from the first step on). Schedule: 200 epochs, SGD 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, x0.1 at epochs 100 and 150. Teacher: a WRN-34-10 (AdaAD's)
    on CIFAR-10."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    pgd = training_pgd(eps, alpha, steps, objective="kl", through=teacher)
    branches = [
        Branch(Clean(), LabelSwappedKL(), teacher=teacher, name="nat_kl"),
        Branch(pgd, LabelSwappedKL(), teacher=teacher, name="adv_kl"),
        Branch(pgd, ConsistencyMSE(), teacher=STUDENT, teacher_input=Clean(), name="pcr"),
    ]
    weighter = TeacherMistakeSplit(3, clean=0, adv=1, weights=[1.0, 1.0, pcr_weight])
    return Recipe(as_student(student, num_classes), branches, weighter, name="dgad")


__all__ = ["ConsistencyMSE", "LabelSwappedKL", "TeacherMistakeSplit", "dgad", "swap_true_and_top"]
