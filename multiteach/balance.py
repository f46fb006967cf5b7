"""Teacher-temperature balance of B-MTARD (Zhao et al., TPAMI 2024), as an optional recipe component.

Each teacher k softens its output by its own temperature T_k (the student stays at T = 1). After every
batch, a teacher whose softened output is more uncertain than the others' is sharpened and vice versa:

    T_k <- clip(T_k - lr * sign(H_k / mean_{j != k} H_j - 1), t_min, t_max)

H_k is the mean entropy of softmax(teacher_k / T_k). For two teachers this is the official update
(lr = 0.001, T in [1, 10], lr decayed x0.1 with the learning rate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .losses import entropy


class EntropyBalance(nn.Module):
    def __init__(self, n: int = 2, lr: float = 0.001, t_min: float = 1.0, t_max: float = 10.0,
                 follow_lr: bool = True) -> None:
        super().__init__()
        if n < 2:
            raise ValueError(f"EntropyBalance balances at least two teachers, got n={n}")
        if not 0 < t_min <= t_max:
            raise ValueError(f"need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        self.n, self.lr, self.t_min, self.t_max, self.follow_lr = n, lr, t_min, t_max, follow_lr
        self.rate_scale = 1.0
        self.register_buffer("temperatures", torch.full((n,), float(t_min)))

    def on_lr(self, ratio: float) -> None:
        if self.follow_lr:
            self.rate_scale = ratio

    def forward(self, targets: list[Tensor], sync: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        """Soften each teacher's logits by its temperature, then move the temperatures (``sync``: the
        distributed mean, so every rank moves them alike)."""
        if len(targets) != self.n:
            raise ValueError(f"EntropyBalance was built for {self.n} teachers, the recipe has {len(targets)}")
        temps = self.temperatures.to(targets[0].device)
        soft = [t.float() / temps[k] for k, t in enumerate(targets)]
        h = torch.stack([entropy(s) for s in soft])
        if sync is not None:
            h = sync(h)
        others = (h.sum() - h) / (self.n - 1)
        step = self.lr * self.rate_scale * torch.sign(h / others - 1.0)
        self.temperatures.copy_((temps - step).clamp(self.t_min, self.t_max))
        return soft

    def extra_repr(self) -> str:
        return f"n={self.n}, lr={self.lr}, T in [{self.t_min}, {self.t_max}]"


__all__ = ["EntropyBalance"]
