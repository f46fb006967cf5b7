"""Distillation and classification losses: small modules with one formula each.

Every loss is called as ``loss(student_out, target_out, y)`` and returns one value per sample, shape (B,),
whose batch mean is the loss as its paper reduces it (so per-sample weighters can weigh samples, and a
branch weight times the mean is the old scalar loss). ``target_out`` is the branch teacher's output (``None``
for label-only losses); feature losses read intermediate features instead of logits.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["mean", "batchmean", "sum"]


def _check_shapes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; build both with the same num_classes"
        )


def kl_per_sample(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """KL(teacher || student) of the softened distributions, one value per sample, scaled so that its batch
    mean is :func:`kl_divergence` with the same ``reduction`` (``"mean"``: KL / C; ``"batchmean"``: KL;
    ``"sum"``: KL x B)."""
    _check_shapes(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_element = log_p_t.exp() * (log_p_t - log_p_s)
    if reduction == "mean":
        return per_element.mean(1)
    if reduction == "batchmean":
        return per_element.sum(1)
    if reduction == "sum":
        return per_element.sum(1) * student_logits.shape[0]
    raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'batchmean' or 'sum'")


def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """KL(teacher || student) of the softened distributions, reduced over the batch.

    ``reduction="mean"`` averages over batch x classes (per-sample KL / C), as the MTARD, RSLAD and ARD code
    do; ``"batchmean"`` is the textbook per-sample mean; ``"sum"`` sums over the batch.
    """
    return kl_per_sample(student_logits, teacher_logits, temperature, reduction).mean()


def cw_margin(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample Carlini-Wagner margin ``max_{j != y} z_j - z_y`` capped at ``kappa`` (larger = more wrong).

    Ascending it is ascending the CW loss ``-max(z_y - max_{j != y} z_j + kappa, 0)`` of the CAT/GAIRAT code
    (kappa = 50): a sample misclassified by a margin of kappa stops moving."""
    one_hot = F.one_hot(y, logits.shape[1]).bool()
    true = logits.masked_fill(~one_hot, 0).sum(1)
    other = logits.masked_fill(one_hot, float("-inf")).amax(1)
    return (other - true).clamp(max=kappa)


def entropy(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Mean entropy of ``softmax(logits / temperature)`` over the batch."""
    return entropy_per_sample(logits, temperature).mean()


def entropy_per_sample(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` of each sample, shape (B,)."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(1)


class KLDistill(nn.Module):
    """``scale * KL(teacher/T || student/T)`` per sample, times ``T^2`` when ``temperature_squared`` (Hinton;
    ARD); ``reduction`` sets the scale as :func:`kl_per_sample` does."""

    def __init__(self, temperature: float = 1.0, reduction: Reduction = "mean", scale: float = 1.0,
                 temperature_squared: bool = False) -> None:
        super().__init__()
        if reduction not in ("mean", "batchmean", "sum"):
            raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'batchmean' or 'sum'")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
        self.temperature = temperature
        self.reduction: Reduction = reduction
        self.scale = scale
        self.temperature_squared = temperature_squared

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        if teacher_logits is None:
            raise ValueError("KLDistill needs a teacher on its branch")
        t = self.temperature
        loss = kl_per_sample(student_logits, teacher_logits, t, self.reduction)
        factor = self.scale * (t * t if self.temperature_squared else 1.0)
        return loss * factor if factor != 1.0 else loss

    def extra_repr(self) -> str:
        return f"T={self.temperature}, reduction={self.reduction!r}, scale={self.scale}"


class CrossEntropy(nn.Module):
    """Cross-entropy to the labels per sample (label-only branch: SAT, natural training, TRADES' clean term)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        return F.cross_entropy(student_logits.float(), y, label_smoothing=self.label_smoothing, reduction="none")


class FeatureHint(nn.Module):
    """FitNet's hint loss (Romero et al. 2015): ``mean((projector(f_S) - f_T)^2)`` per sample, over an
    intermediate feature of the student and of the teacher. The projector (a 1x1 convolution, or identity
    when the channel counts agree) trains with the student; build it from the two channel counts, which
    :func:`multiteach.features.feature_shapes` measures."""

    def __init__(self, student_channels: int, teacher_channels: int, projector: nn.Module | None = None) -> None:
        super().__init__()
        if projector is None:
            projector = nn.Identity() if student_channels == teacher_channels else \
                nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.projector = projector

    def forward(self, student_feature: Tensor, teacher_feature: Tensor | None, y: Tensor) -> Tensor:
        if teacher_feature is None:
            raise ValueError("FeatureHint needs a teacher feature on its branch (set the branch's teacher_layer)")
        s = self.projector(student_feature)
        if s.shape != teacher_feature.shape:
            raise ValueError(f"projected student feature {tuple(s.shape)} and teacher feature "
                             f"{tuple(teacher_feature.shape)} differ: pick layers of the same spatial size")
        return (s.float() - teacher_feature.float()).pow(2).flatten(1).mean(1)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct top-1 predictions, as a 0-d tensor (no host sync)."""
    return (logits.argmax(1) == y).float().mean()


__all__ = ["CrossEntropy", "FeatureHint", "KLDistill", "accuracy", "cw_margin", "entropy", "entropy_per_sample",
           "kl_divergence", "kl_per_sample"]
