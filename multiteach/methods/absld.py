"""ABSLD (Zhao et al., NeurIPS 2024): RSLAD whose teacher soft labels are softened per class, by a temperature
that each epoch moves against the student's per-class loss (hard classes get sharper labels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import kl_per_sample
from ..recipe import Branch, Recipe, epoch_sum
from ..transforms import PGD, Clean
from ..weighting import Fixed
from ._common import ModelLike, as_student, as_teacher, register

ABSLD_SCHEDULE = {"epochs": 300, "milestones": (215, 260, 285)}


class ClassTemperatureKL(nn.Module):
    """KL(softmax(t / T_y) || softmax(s)) / C per sample: the teacher's logits over the temperature of the
    sample's class (the student's are not scaled), with ABSLD's per-class temperature update.

    During the epoch it sums the student's cross-entropy CE(s, y) per class (on the input its branch reads);
    ``on_epoch_end`` (sums over DDP ranks with :func:`epoch_sum`) moves every temperature against its class's
    gap to the mean, normalised by the largest gap, and clips:

        L_c = sum_{i: y_i = c} CE(s_i, y_i),   g = L - mean_c L_c
        T <- clip(T - lr_e * g / max_c |g_c|, t_min, t_max)

    ``lr_e = lr * gamma^(number of milestones <= epochs finished)``: the official script multiplies its rate by
    0.1 with the LR at the end of epochs 215, 260, 285 (1-based), before that epoch's update.
    """

    def __init__(self, num_classes: int = 10, lr: float = 0.1, t_init: float = 1.0, t_min: float = 0.5,
                 t_max: float = 5.0, milestones: Sequence[int] = (215, 260, 285), gamma: float = 0.1) -> None:
        super().__init__()
        if not 0 < t_min <= t_init <= t_max:
            raise ValueError(f"temperatures need 0 < t_min <= t_init <= t_max, got {t_min}, {t_init}, {t_max}")
        self.lr, self.t_min, self.t_max, self.gamma = float(lr), float(t_min), float(t_max), float(gamma)
        self.milestones = tuple(int(m) for m in milestones)
        self.register_buffer("temperature", torch.full((num_classes,), float(t_init)))
        self.register_buffer("class_loss", torch.zeros(num_classes, dtype=torch.float64))  # this epoch's sums
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))  # epochs finished (the rate's decay)

    def soften(self, logits: Tensor, y: Tensor) -> Tensor:
        """``logits / T_y`` row by row (float32)."""
        return logits.float() / self.temperature[y].unsqueeze(1)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        if teacher_logits is None:
            raise ValueError("ClassTemperatureKL needs a teacher on its branch")
        with torch.no_grad():
            ce = F.cross_entropy(student_logits.detach().float(), y, reduction="none")
            self.class_loss.index_add_(0, y, ce.double())
        return kl_per_sample(student_logits, self.soften(teacher_logits, y), 1.0, "mean")

    def rate(self, epochs: int) -> float:
        """The update's rate after ``epochs`` finished epochs."""
        return self.lr * self.gamma ** sum(epochs >= m for m in self.milestones)

    @torch.no_grad()
    def on_epoch_end(self) -> None:
        self.epochs += 1
        total = epoch_sum(self.class_loss)
        gap = total - total.mean()
        step = self.rate(int(self.epochs)) * gap / gap.abs().max().clamp_min(1e-30)  # no samples: no move
        self.temperature.copy_((self.temperature.double() - step).clamp(self.t_min, self.t_max))
        self.class_loss.zero_()

    def extra_repr(self) -> str:
        return (f"classes={len(self.temperature)}, lr={self.lr}, clip=[{self.t_min}, {self.t_max}], "
                f"milestones={self.milestones}")


class ClassTemperedPGD(PGD):
    """PGD whose KL reference (the teacher's clean output) is divided by the per-class temperatures of
    ``temperatures``: ABSLD's attack ascends the KL to the adversarial branch's softened soft labels."""

    def __init__(self, temperatures: ClassTemperatureKL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperatures = temperatures

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        if reference is not None:
            reference = self.temperatures.soften(reference, y)
        return super().perturb(model, x, y, reference)


@register("absld", "ABSLD, Zhao et al. 2024: RSLAD with per-class teacher temperatures moved each epoch "
          "against the student's per-class CE", ("adv",), **ABSLD_SCHEDULE)
def absld(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
          eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, temperature_lr: float = 0.1,
          t_init: float = 1.0, t_min: float = 0.5, t_max: float = 5.0,
          temperature_milestones: Sequence[int] = (215, 260, 285)) -> Recipe:
    """ABSLD (zhaoshiji123/ABSLD, resnet18_absld_cifar10.py): RSLAD's two terms, 5/6 on PGD examples and 1/6
    on clean ones, both against the teacher's clean logits divided by a per-class temperature, one table per
    term: 5/6 KL(T(x)/T^adv_y || S(x')) + 1/6 KL(T(x)/T^nat_y || S(x)), the student's logits unscaled, KL
    averaged over batch x classes. The attack ascends the KL to T(x)/T^adv_y (sum) from x + 0.001*N(0,1),
    10 steps of 2/255 in eps 8/255, student in eval mode. Temperatures start at 1, clipped to [0.5, 5]; after
    each epoch each table moves by 0.1 x (its class's summed student CE minus the mean over classes) / the
    largest such gap, on PGD examples for T^adv and on clean images for T^nat (train-mode student logits);
    the rate decays x0.1 with the LR at ``temperature_milestones`` (the official 215, 260, 285: pass your
    schedule's milestones when training on another). Official schedule: 300 epochs, SGD lr 0.1, momentum 0.9,
    weight decay 2e-4, batch 128. The code's ``log(p_T + 1e-5)`` in the KL value is left out, as in ``rslad``
    (it shifts the value by < 1e-5 and not the gradient). The paper and the code agree on the update."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")

    def table() -> ClassTemperatureKL:
        return ClassTemperatureKL(num_classes, temperature_lr, t_init, t_min, t_max, temperature_milestones)

    adv_kl, nat_kl = table(), table()
    pgd = ClassTemperedPGD(adv_kl, eps=eps, alpha=alpha, steps=steps, start="normal", objective="kl",
                           reference=teacher)
    branches = [
        Branch(pgd, adv_kl, teacher=teacher, teacher_input=Clean(), name="adv_kl"),
        Branch(Clean(), nat_kl, teacher=teacher, name="nat_kl"),
    ]
    return Recipe(as_student(student, num_classes), branches, Fixed([5 / 6, 1 / 6]), name="absld")


__all__ = ["ClassTemperatureKL", "ClassTemperedPGD", "absld"]
