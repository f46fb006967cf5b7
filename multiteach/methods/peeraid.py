"""PeerAiD (Jung et al., CVPR 2024): an online peer, trained on the student's adversarial examples, teaches it.

    x'  = PGD against the student, ascending KL(P(x) || S(x'))       (P(x): the peer's clean output, eval mode)
    L_P = gamma1 CE(P(x'), y) + gamma2 tau^2 KL(S(x')/tau || P(x')/tau)                    (the peer's own loss)
    L_S = lamb1 CE(S(x'), y) + lamb2 T^2 KL(P(x')/T || S(x')/T) + lamb3 T^2 KL(S(x)/T || S(x')/T)

KL(A || B) is the divergence of the student-side distribution B from the target A, averaged over batch x
classes as ``nn.KLDivLoss()``. Written from the facts of jaewonalive/PeerAiD (GPL-3.0); no code copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import CrossEntropy, KLDistill, kl_per_sample
from ..recipe import STUDENT, Branch, Recipe
from ..teachers import Teacher
from ..transforms import PGD, Clean, module_mode
from ._common import ModelLike, WeighterSpec, as_student, as_teacher, register, weighter_for


class PeerKLPGD(PGD):
    """PGD against the student ascending KL(P(x) || S(x')) summed, P(x) the peer's output on the clean batch
    in eval mode without a graph (PeerAiD's attack). The peer is trainable, so its reference is computed here
    rather than by the recipe, which would run a trainable teacher in train mode and add its own loss on the
    clean batch."""

    def __init__(self, peer: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10) -> None:
        super().__init__(eps=eps, alpha=alpha, steps=steps, start="normal", objective="kl", bn_mode="eval")
        self.peer = peer
        self.needs_reference = False  # the recipe passes none: perturb makes its own

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        with torch.no_grad(), module_mode(self.peer, "eval"):
            reference = self.peer(x)
        return super().perturb(model, x, y, reference)


class PeerLoss(nn.Module):
    """The peer's own objective on x': ``gamma1 CE(P, y) + gamma2 tau^2 KL(S/tau || P/tau)`` per sample, the KL
    over classes averaged (``nn.KLDivLoss()``); the student's output ``S`` arrives detached."""

    def __init__(self, gamma1: float = 1.0, gamma2: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__()
        self.gamma1, self.gamma2, self.temperature = gamma1, gamma2, temperature

    def forward(self, peer_logits: Tensor, student_logits: Tensor, y: Tensor) -> Tensor:
        t = self.temperature
        ce = F.cross_entropy(peer_logits.float(), y, reduction="none")
        return self.gamma1 * ce + self.gamma2 * t * t * kl_per_sample(peer_logits, student_logits, t, "mean")

    def extra_repr(self) -> str:
        return f"gamma1={self.gamma1}, gamma2={self.gamma2}, tau={self.temperature}"


class ReverseKL(nn.Module):
    """``tau^2 KL(S/tau || P/tau)`` per sample (classes averaged), the gradient through the student's side
    ``S``: the student's share of the peer's KL term, which the official code back-propagates into the student
    (its peer loss reads the student's output undetached and both losses share one backward)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: Tensor, peer_logits: Tensor | None, y: Tensor) -> Tensor:
        if peer_logits is None:
            raise ValueError("ReverseKL needs the peer on its branch")
        t = self.temperature
        return t * t * kl_per_sample(peer_logits, student_logits, t, "mean")

    def extra_repr(self) -> str:
        return f"tau={self.temperature}"


@register("peeraid", "PeerAiD, Jung et al. 2024: a peer trained online on the student's PGD examples teaches it, "
          "T^2 KL(P(x')/T || S(x')/T) + T^2 KL(S(x)/T || S(x')/T), T = 5", ("peer",), epochs=300,
          milestones=(214, 259, 284))
def peeraid(student: ModelLike = "cifar_resnet18", peer_teacher: ModelLike | None = None, *, num_classes: int = 10,
            eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, temperature: float = 5.0,
            lamb1: float = 0.0, lamb2: float = 1.0, lamb3: float = 1.0, gamma1: float = 1.0,
            gamma2: float | None = None, peer_temperature: float = 1.0, peer_lr: float = 0.1,
            peer_momentum: float = 0.9, peer_weight_decay: float = 2e-4, weighter: WeighterSpec = "fixed") -> Recipe:
    """PeerAiD (jaewonalive/PeerAiD, main.py ``train_kd`` and training_scripts/resnet18_cifar10.sh).

    ``peer_teacher`` is the peer's initial network (the code trains a fresh ResNet-18 from scratch beside the
    student); it is re-wrapped as a trainable Teacher, so the module passed in is trained in place. Each step:

    - attack: PGD-10 against the student in eval mode, eps 8/255, step 2/255, start x + 0.001 N(0, 1), ascending
      the summed KL(P(x) || S(x')) to the peer's clean prediction (peer in eval mode, no gradient);
    - peer (train mode) on x': ``gamma1 CE(P(x'), y) + gamma2 tau^2 KL(S(x')/tau || P(x')/tau)``, gamma1 = 1,
      gamma2 = 0.1 (1.0 in the CIFAR-100 scripts: the default follows ``num_classes``), tau = 1; the student's
      output is the KL's target; SGD lr 0.1, momentum 0.9, weight decay 2e-4, decayed x0.1 at epochs 214,
      259, 284 (0-based) like the student's, 300 epochs, batch 128;
    - student: ``lamb1 CE(S(x'), y) + lamb2 T^2 KL(P(x')/T || S(x')/T) + lamb3 T^2 KL(S(x)/T || S(x')/T)`` with
      T = 5, lamb = (0, 1, 1) (a lamb1 of 0 drops the CE branch); the peer's output is detached, the clean
      output S(x) is not (the gradient runs through both of the student's outputs, as TRADES');
    - every KL is ``nn.KLDivLoss()``'s mean over batch x classes, times the squared temperature.

    Code over paper: the code's peer loss reads the student's output *without* detaching it, and the two
    losses share one backward, so the student also descends ``gamma2 tau^2 KL(S(x')/tau || P(x')/tau)``
    (the gradient flowing through the KL's target). The preset keeps it as the branch ``peer_pull`` (weight
    gamma2); the peer's own gradient is that of its loss with the student's output detached, as in the code.
    (The logged total therefore holds this KL's value twice, once on each side; each gradient holds it once.)

    SWA: the published runs pass ``--swa_s``: from the first LR decay (epoch 214) to the end, an SWA copy
    holds the uniform average of the student's weights at the end of each epoch (86 snapshots), its BN
    statistics recomputed over the training set after each update; the code evaluates both the student and
    the SWA student. The trainer has no SWA. Its nearest tool is ``TrainConfig(ema_decay=...)``, an
    exponential average from the first step, BN buffers averaged too, with validation choosing raw or EMA
    weights; ``ema_decay=0.9999`` (a horizon of ~10k steps, ~26 epochs at batch 128 on 50k images, leaving ~3%
    of the weight on the weights from before epoch 214) is the recommended stand-in, not an equivalent.

    Smaller differences: the code forwards the student twice on x' in train mode (its BN running statistics
    move twice), the recipe once; the code selects its "best" student by PGD-10 on the test set, the trainer by
    its validation split. TinyImageNet's scripts use T = 1, lamb = (0.035, 35, 20), gamma2 = 100, 200 epochs
    with decays at 99 and 149: pass them as options and set the schedule."""
    if gamma2 is None:
        gamma2 = 1.0 if num_classes == 100 else 0.1
    given = as_teacher(peer_teacher, num_classes, "peer")
    peer = Teacher(given.model, name=given.name, trainable=True, loss=PeerLoss(gamma1, gamma2, peer_temperature),
                   optimizer={"name": "sgd", "lr": peer_lr, "momentum": peer_momentum,
                              "weight_decay": peer_weight_decay})
    pgd = PeerKLPGD(peer, eps, alpha, steps)
    branches = [
        Branch(pgd, KLDistill(temperature, "mean", temperature_squared=True), teacher=peer, name="peer_kd"),
        Branch(pgd, KLDistill(temperature, "mean", temperature_squared=True), teacher=STUDENT,
               teacher_input=Clean(), name="self_kd"),
        Branch(pgd, ReverseKL(peer_temperature), teacher=peer, name="peer_pull"),
    ]
    weights = [lamb2, lamb3, gamma2]
    if lamb1 > 0:
        branches.append(Branch(pgd, CrossEntropy(), name="adv_ce"))
        weights.append(lamb1)
    return Recipe(as_student(student, num_classes), branches,
                  weighter_for(weighter, len(branches), "fixed", weights=weights), name="peeraid")


__all__ = ["PeerKLPGD", "PeerLoss", "ReverseKL", "peeraid"]
