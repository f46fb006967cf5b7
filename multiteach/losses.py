"""Distillation and classification losses: small modules with one formula each.

Every loss is called as ``loss(student_logits, target_logits, y)``; ``target_logits`` is the branch
teacher's output (``None`` for label-only losses).
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["mean", "batchmean", "sum"]


def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """KL(teacher || student) of the softened distributions.

    ``reduction="mean"`` averages over batch x classes (per-sample KL / C), as the MTARD, RSLAD and ARD code
    do; ``"batchmean"`` is the textbook per-sample mean; ``"sum"`` sums over the batch.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; build both with the same num_classes"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_element = log_p_t.exp() * (log_p_t - log_p_s)
    if reduction == "mean":
        return per_element.mean()
    if reduction == "batchmean":
        return per_element.sum() / student_logits.shape[0]
    if reduction == "sum":
        return per_element.sum()
    raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'batchmean' or 'sum'")


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
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


class KLDistill(nn.Module):
    """``scale * KL(teacher/T || student/T)``, times ``T^2`` when ``temperature_squared`` (Hinton; ARD)."""

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
        loss = kl_divergence(student_logits, teacher_logits, t, self.reduction)
        factor = self.scale * (t * t if self.temperature_squared else 1.0)
        return loss * factor if factor != 1.0 else loss

    def extra_repr(self) -> str:
        return f"T={self.temperature}, reduction={self.reduction!r}, scale={self.scale}"


class CrossEntropy(nn.Module):
    """Cross-entropy to the labels (label-only branch: SAT, natural training, TRADES' clean term)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor) -> Tensor:
        return F.cross_entropy(student_logits.float(), y, label_smoothing=self.label_smoothing)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct top-1 predictions, as a 0-d tensor (no host sync)."""
    return (logits.argmax(1) == y).float().mean()


__all__ = ["CrossEntropy", "KLDistill", "accuracy", "cw_margin", "entropy", "kl_divergence"]
