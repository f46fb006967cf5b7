"""CIARD (Lu et al., ICCV 2025): MTARD's two teachers with B-MTARD's temperatures, a push away from the clean
teacher where it errs on the adversarial example, and the robust teacher fine-tuned online on those examples:

    L_S = KL(T_adv(x')/t_adv || S(x')) + KL(T_nat(x)/t_nat || S(x)) - w KL(T_nat(x') || S(x')/5)[T_nat(x') wrong]
    L_T = CE(T_adv(x'), y)                                              (the robust teacher's own loss, epoch >= 50)

w is the power of ten that brings the push term to the magnitude of the smaller of the two distillation terms.
As the official code (eminentgu/CIARD, CIARD.py and mtard_loss.py) writes it; no code copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..balance import EntropyBalance
from ..recipe import Branch, Recipe
from ..registry import WEIGHTERS
from ..teachers import Teacher
from ..transforms import Clean
from ..weighting import Weighter, _as_losses
from ._common import ModelLike, WeighterSpec, as_student, as_teacher, register, training_pgd, weighter_for

LOG_EPS = 1e-5  # the code's kl_loss and entropy read log(p + 1e-5)


def eps_kl(student_logits: Tensor, target_logits: Tensor) -> Tensor:
    """The code's ``mean(kl_loss(log_softmax(s), softmax(t)))`` per sample: ``mean_c p (log(p + 1e-5) - log q)``,
    p = softmax(t), q = softmax(s); its batch mean is the code's mean over batch x classes."""
    log_q = F.log_softmax(student_logits.float(), dim=1)
    p = F.softmax(target_logits.float(), dim=1)
    return (p * (torch.log(p + LOG_EPS) - log_q)).mean(1)


class EpsKL(nn.Module):
    """KL(softmax(target) || softmax(student)) per sample as the code writes it (log(p + 1e-5), classes
    averaged): MTARD's KLDistill(1, "mean") up to the 1e-5, which moves the value, not the gradient."""

    def forward(self, student_logits: Tensor, target_logits: Tensor | None, y: Tensor) -> Tensor:
        if target_logits is None:
            raise ValueError("EpsKL needs a teacher on its branch")
        return eps_kl(student_logits, target_logits)


class PushLoss(nn.Module):
    """The push term: ``-KL(T(x') || S(x')/T_s)`` averaged over the samples whose teacher prediction
    ``argmax T(x')`` is not the label (0 when there is none); the teacher's softmax at T = 1, the student's at
    ``student_temperature`` = 5. Per sample: ``-[wrong_i] (B / n_wrong) kl_i``, so the batch mean is the
    code's mean over the wrong samples x classes, negated (the code subtracts it from the loss)."""

    def __init__(self, student_temperature: float = 5.0) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        if teacher_logits is None:
            raise ValueError("PushLoss needs the clean teacher on its branch")
        wrong = (teacher_logits.argmax(1) != y).float()
        kl = eps_kl(student_logits.float() / self.student_temperature, teacher_logits.detach())
        return -kl * wrong * (len(y) / wrong.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"student_temperature={self.student_temperature}"


@WEIGHTERS.register("magnitude")
class MagnitudeMatch(Weighter):
    """Weight 1 for every branch but the ``scaled`` ones; a scaled branch k weighs the power of ten that brings
    its loss to the order of magnitude of the smallest other loss (CIARD's ``scale_to_magnitude``):

        w_k = 10^(min_{j not scaled} floor(log10 |L_j|) - floor(log10 |L_k|))      (a loss of exactly 0 reads 1e-7)
    """

    def __init__(self, n: int, scaled: Sequence[int] = (-1,)) -> None:
        super().__init__(n)
        idx = sorted({i % n for i in scaled})
        if not idx or len(idx) == n:
            raise ValueError(f"MagnitudeMatch needs at least one scaled and one unscaled branch, got scaled={scaled}")
        self.scaled = idx
        self.register_buffer("_mask", torch.tensor([i in idx for i in range(n)]), persistent=False)

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        loss = _as_losses(losses, self.n, self.device)
        loss = loss.double() if loss.device.type != "mps" else loss  # the code's log10 runs on Python floats
        loss = torch.where(loss == 0, torch.full_like(loss, 1e-7), loss)
        magnitude = torch.floor(torch.log10(loss.abs()))
        target = magnitude.masked_fill(self._mask, math.inf).min()
        return torch.where(self._mask, torch.pow(10.0, target - magnitude), torch.ones_like(loss)).float()

    def extra_repr(self) -> str:
        return f"n={self.n}, scaled={self.scaled}"


class EpochClock(nn.Module):
    """Epochs finished, a buffer counted by ``on_epoch_end`` (the recipe calls it on its loss modules and saves
    it with them), for components that switch on or off at an epoch but see no ``StepContext``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def on_epoch_end(self) -> None:
        self.epoch += 1


class DelayedCE(nn.Module):
    """The robust teacher's own loss, ``CE(T(x'), y)`` per sample from epoch ``start`` on (epochs finished on
    ``clock``); before it, the same graph times 0: a zero loss with a zero gradient (no host sync)."""

    def __init__(self, clock: EpochClock, start: int = 50) -> None:
        super().__init__()
        self.clock, self.start = clock, start

    def forward(self, teacher_logits: Tensor, student_logits: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(teacher_logits.float(), y, reduction="none")
        return ce * (self.clock.epoch >= self.start).to(ce.dtype)

    def extra_repr(self) -> str:
        return f"start={self.start}"


class CIARDTemperatures(EntropyBalance):
    """B-MTARD's temperature balance of the first two teachers (robust on x', clean on x) as CIARD's code runs
    it: entropies with log(p + 1e-5), the rate constant (``follow_lr`` off) until epoch ``freeze_epoch`` and 0
    from then on (the code multiplies it by 0.1 at every step of epoch 215, 1-based). Further logit targets
    (the push term's clean teacher on x') pass through unsoftened."""

    def __init__(self, clock: EpochClock, lr: float = 0.001, t_min: float = 1.0, t_max: float = 10.0,
                 freeze_epoch: int | None = 214) -> None:
        super().__init__(2, lr=lr, t_min=t_min, t_max=t_max, follow_lr=False)
        self.clock, self.freeze_epoch = clock, freeze_epoch

    def forward(self, targets: list[Tensor], sync: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        temps = self.temperatures.to(targets[0].device)
        soft = [t.float() / temps[k] for k, t in enumerate(targets[:2])]
        h = torch.stack([-(p * torch.log(p + LOG_EPS)).sum(1).mean() for p in (F.softmax(s, 1) for s in soft)])
        if sync is not None:
            h = sync(h)
        rate = self.lr if self.freeze_epoch is None else self.lr * (self.clock.epoch < self.freeze_epoch).float()
        step = rate * torch.sign(h / h.flip(0) - 1.0)
        self.temperatures.copy_((temps - step).clamp(self.t_min, self.t_max))
        return soft + list(targets[2:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen from epoch {self.freeze_epoch}"


@register("ciard", "CIARD, Lu et al. 2025: MTARD + a push from the clean teacher's errors on x' + the robust "
          "teacher fine-tuned online from epoch 50", ("adv", "nat"), epochs=300, schedule="cosine", hold_fraction=0.5,
          milestones=())
def ciard(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None,
          nat_teacher: ModelLike | None = None, *, num_classes: int = 10, eps: float = 8 / 255,
          alpha: float = 2 / 255, steps: int = 10, push_temperature: float = 5.0, teacher_lr: float = 1e-4,
          teacher_momentum: float = 0.1, teacher_weight_decay: float = 2e-4, teacher_start_epoch: int = 50,
          temperature_lr: float = 0.001, t_max: float = 10.0, temperature_freeze_epoch: int | None = 214,
          weighter: WeighterSpec = "magnitude") -> Recipe:
    """CIARD (eminentgu/CIARD, CIARD.py with mtard_loss.robust_inner_loss_push). Each step:

    - attack: MTARD's PGD-10 against the student in eval mode, eps 8/255, step 2/255, start x + 0.001 N(0, 1),
      CE; the robust teacher reads x' in *train* mode (it is trained; batch statistics from the first epoch),
      the clean teacher reads x and x' in eval mode;
    - student: ``KL(T_adv(x')/t_adv || S(x')) + KL(T_nat(x)/t_nat || S(x)) - w KL(T_nat(x') || S(x')/5)``, the
      last averaged over the samples the clean teacher misclassifies on x'; every KL is the code's
      ``mean(kl_loss)``, p (log(p + 1e-5) - log q) averaged over batch x classes, teachers detached;
    - weights 1 and 1: the code computes MTARD's ANL weights but does not use them ("for ablation with MTARD");
      w = 10^(min(floor log10 KL_adv, floor log10 KL_nat) - floor log10 KL_push) (the ``magnitude`` weighter);
    - temperatures: B-MTARD's, start 1, in [1, 10], moved by 0.001 x sign(H_k / H_other - 1) after each step;
      the code's rate is multiplied by 0.1 at every step of epochs 215, 260, 285 (inside the batch loop), so it
      stops moving during epoch 215 (1-based): ``temperature_freeze_epoch = 214`` (0-based);
    - robust teacher: ``CE(T_adv(x'), y)`` on the same x', back-propagated only when epoch > 50 (1-based), by
      its own SGD (lr 1e-4, momentum 0.1, weight decay 2e-4). The preset passes its loss ``DelayedCE``: before
      epoch 50 (0-based) it is 0 with a zero gradient, so SGD's weight decay alone shrinks the teacher by
      ~2e-8 per step (~4e-4 over 50 epochs); the code takes no step then.

    Schedule: the code's student LR is 0.1 to epoch 150, then 0.1 (1/2 + cos(pi (e - 150)/150)/2)
    exp(-0.01 ((e - 150)/150)^2) to 0 at 300; the registered one is that without the exp factor (which lowers
    it by at most 1%): cosine held for half the epochs, followed per step rather than per epoch. The trainer
    has one schedule, which the teacher's optimizer follows too; the code's teacher LR is 1e-4 times the same
    form over epochs 50-300. The code forwards the robust teacher on the clean batch in train mode too (output
    unused: only its BN running statistics move) and runs the student's clean forward before the attack
    (its attack's eval-mode BN statistics already hold this batch's clean statistics; here they do not). Its
    released student is a MobileNetV2 (a ResNet-18 commented out), with a WRN-34-10 robust teacher
    (``model_cifar_wrn.pt``, the name of TRADES' release; the README points to DeepMind's robust models) and a
    ResNet-56 clean teacher.

    ``adv_teacher`` is re-wrapped as a trainable Teacher: the module passed in is trained in place.
    ``weighter`` replaces the magnitude weights (the push term's loss is negative: a weighter sees -KL)."""
    adv = as_teacher(adv_teacher, num_classes, "adv")
    nat = as_teacher(nat_teacher, num_classes, "nat")
    clock = EpochClock()
    robust = Teacher(adv.model, name=adv.name, trainable=True, loss=DelayedCE(clock, teacher_start_epoch),
                     optimizer={"name": "sgd", "lr": teacher_lr, "momentum": teacher_momentum,
                                "weight_decay": teacher_weight_decay})
    pgd = training_pgd(eps, alpha, steps)
    branches = [
        Branch(pgd, EpsKL(), teacher=robust, name="adv"),
        Branch(Clean(), EpsKL(), teacher=nat, name="nat"),
        Branch(pgd, PushLoss(push_temperature), teacher=nat, name="push"),
    ]
    balance = CIARDTemperatures(clock, lr=temperature_lr, t_max=t_max, freeze_epoch=temperature_freeze_epoch)
    recipe = Recipe(as_student(student, num_classes), branches, weighter_for(weighter, 3, "magnitude", scaled=[2]),
                    balance=balance, name="ciard")
    recipe.loss_modules.append(clock)  # the recipe advances it after every epoch and checkpoints it
    return recipe


__all__ = ["CIARDTemperatures", "DelayedCE", "EpochClock", "EpsKL", "MagnitudeMatch", "PushLoss", "ciard",
           "eps_kl"]
