"""Weighters: map one step's losses to the weights of the total loss, one formula per class.

A weighter reads a :class:`StepContext` (per-sample losses of every branch, the labels, the student's and the
teachers' outputs, the epoch) and returns weights per branch, shape (N,), or per branch and sample, (N, B),
used as constants in the backward: ``total = sum_i mean_b W_ib L_ib``. Batch-level formulas (ANL, DWA, ...)
implement ``update(losses) -> weights`` on the N batch-mean losses; per-sample and per-class ones override
``weigh(ctx)``. Every state a weighter carries (running averages, per-class tables) is in its
``state_dict``, so a resumed run follows the same trajectory. Weighters run on the losses' device with no
host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .registry import WEIGHTERS


@dataclass
class StepContext:
    """What a weighter may read at one step. Outputs are detached; ``sync`` averages over DDP ranks."""

    losses: Tensor  # (N, B) per-sample losses, detached
    y: Tensor  # (B,) labels
    student: list[Tensor | None] = field(default_factory=list)  # branch i's student output
    targets: list[Tensor | None] = field(default_factory=list)  # branch i's target (teacher output)
    epoch: int = 0  # epochs finished before this step
    sync: Callable[[Tensor], Tensor] | None = None
    _batch: Tensor | None = field(default=None, repr=False)

    def batch_losses(self) -> Tensor:
        """(N,) mean loss of each branch over the global batch (all ranks under DDP, reduced once): what
        batch-level weighters read, so every rank computes the same weights."""
        if self._batch is None:
            mean = self.losses.float().mean(1)
            self._batch = mean if self.sync is None else self.sync(mean)
        return self._batch


def _as_losses(losses: Sequence[float] | Tensor, n: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(losses, dtype=torch.float32, device=device) if not isinstance(losses, Tensor) \
        else losses.detach().float().to(device)
    if t.shape != (n,):
        raise ValueError(f"expected {n} losses (one per branch), got shape {tuple(t.shape)}")
    return t


class Weighter(nn.Module):
    """Base class. Batch-level formulas implement ``update``; per-sample ones override ``weigh``; those whose
    total is not a weighted sum (uncertainty weighting) override ``combine``. Weights are constants of the
    step unless ``differentiable`` (CA-MKD's feature weights, which its code back-propagates through)."""

    differentiable: bool = False

    def __init__(self, n: int) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a weighter needs at least one branch, got n={n}")
        self.n = n
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        """(N,) weights from the (N,) batch losses (batch-level formulas)."""
        raise NotImplementedError

    def weigh(self, ctx: StepContext) -> Tensor:
        """(N,) or (N, B) weights for this step; default: ``update`` on the global batch's mean losses."""
        return self.update(ctx.batch_losses())

    def combine(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(total, reported)``: total = sum_i mean_b W_ib L_ib for the (N, B) per-sample ``losses``;
        ``reported`` is (N,): W itself, or its mean over the batch for per-sample weights."""
        if self.device != losses.device:
            self.to(losses.device)
        w = self.weigh(ctx)
        if not self.differentiable:
            w = w.detach()
        if w.dim() == 1:
            return (w.to(losses.dtype) * losses.mean(1)).sum(), w.detach()
        if w.shape != losses.shape:
            raise ValueError(f"{type(self).__name__} returned weights of shape {tuple(w.shape)} for losses of "
                             f"shape {tuple(losses.shape)}: return (N,) or (N, B)")
        return (w.to(losses.dtype) * losses).mean(1).sum(), w.detach().float().mean(1)

    def on_lr(self, ratio: float) -> None:
        """Called each step with lr / base_lr: weighters whose own rate follows the schedule use it."""

    def on_epoch_end(self) -> None:
        """Called at the end of each epoch (DWA's loss history moves on; per-class tables refresh)."""


@WEIGHTERS.register("fixed")
class Fixed(Weighter):
    """Constant weights: RSLAD's 5/6, 1/6; TRADES' 1, beta; the ablation's 1/2, 1/2 (uniform unless given)."""

    def __init__(self, weights: Sequence[float] | None = None, n: int | None = None) -> None:
        if weights is None:
            if n is None:
                raise ValueError("Fixed needs its weights, or n for uniform weights 1/n")
            weights = [1.0 / n] * n
        if n is not None and len(weights) != n:
            raise ValueError(f"Fixed has {len(weights)} weights for {n} branches")
        super().__init__(len(weights))
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]))

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        _as_losses(losses, self.n, self.weights.device)
        return self.weights.clone()

    def extra_repr(self) -> str:
        return f"weights={[round(w, 6) for w in self.weights.tolist()]}"


@WEIGHTERS.register("anl")
class ANL(Weighter):
    """Adaptive Normalization Loss (Zhao et al., ECCV 2022), for any number of branches.

        r_i(t) = (L_i(t) / L_i(0))^beta / sum_j (L_j(t) / L_j(0))^beta
        w_i(t) = r_w * r_i(t) + (1 - r_w) * w_i(t-1)

    L_i(0) are the losses of the first update; w(0) is uniform unless given. With ``follow_lr`` the rate r_w
    is scaled like the learning rate (the official code multiplies it by 0.1 at every LR decay).
    """

    def __init__(
        self, n: int = 2, beta: float = 1.0, rw: float = 0.025, w0: Sequence[float] | None = None,
        follow_lr: bool = True,
    ) -> None:
        super().__init__(n)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"ANL beta must be >= 0 and finite, got {beta}")
        if not 0 < rw <= 1:
            raise ValueError(f"ANL rate r_w must be in (0, 1], got {rw}")
        w0 = [1.0 / n] * n if w0 is None else [float(w) for w in w0]
        if len(w0) != n:
            raise ValueError(f"ANL w0 has {len(w0)} entries for {n} branches")
        self.beta, self.rw, self.follow_lr = float(beta), float(rw), follow_lr
        self.rate_scale = 1.0
        self.register_buffer("weights", torch.tensor(w0, dtype=torch.float32))
        self.register_buffer("initial", torch.full((n,), float("nan")))

    def on_lr(self, ratio: float) -> None:
        if self.follow_lr:
            self.rate_scale = ratio

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        loss = _as_losses(losses, self.n, self.weights.device)
        self.initial.copy_(torch.where(torch.isnan(self.initial), loss, self.initial))
        ratio = (loss / self.initial.clamp_min(1e-12)) ** self.beta
        r = ratio / ratio.sum()
        rw = self.rw * self.rate_scale
        self.weights.copy_(rw * r + (1.0 - rw) * self.weights)
        return self.weights.clone()

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta}, rw={self.rw}, follow_lr={self.follow_lr}"


@WEIGHTERS.register("dwa")
class DWA(Weighter):
    """Dynamic Weight Average (Liu et al., CVPR 2019): w_i = N softmax_i(r_i / T), r_i = L_i(e-1) / L_i(e-2).

    L_i(e) is branch i's mean loss over epoch e; the first two epochs use w_i = 1, as in the paper.
    """

    def __init__(self, n: int, temperature: float = 2.0) -> None:
        super().__init__(n)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"DWA temperature must be > 0 and finite, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("epoch_sum", torch.zeros(n))
        self.register_buffer("epoch_count", torch.zeros(()))
        self.register_buffer("history", torch.full((2, n), float("nan")))  # [L(e-2), L(e-1)]
        self.register_buffer("weights", torch.ones(n))

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        self.epoch_sum += _as_losses(losses, self.n, self.weights.device)
        self.epoch_count += 1
        return self.weights.clone()

    def on_epoch_end(self) -> None:
        mean = self.epoch_sum / self.epoch_count.clamp_min(1)
        self.history.copy_(torch.stack([self.history[1], mean]))
        r = self.history[1] / self.history[0]
        w = self.n * torch.softmax(r / self.temperature, 0)
        self.weights.copy_(torch.where(torch.isnan(r).any(), torch.ones_like(w), w))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()


@WEIGHTERS.register("uw")
class UncertaintyWeighting(Weighter):
    """Homoscedastic uncertainty weighting (Kendall et al., CVPR 2018), learnable s_i = log sigma_i^2:

        total = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i        (weights reported: 0.5 * exp(-s_i))

    Its parameters join the optimizer (without weight decay).
    """

    def __init__(self, n: int, init: float = 0.0) -> None:
        super().__init__(n)
        self.log_vars = nn.Parameter(torch.full((n,), float(init)))

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        _as_losses(losses, self.n, self.log_vars.device)
        return (0.5 * torch.exp(-self.log_vars)).detach()

    def combine(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        if self.device != losses.device:
            self.to(losses.device)
        s = self.log_vars.float()
        total = (0.5 * torch.exp(-s) * losses.float().mean(1) + 0.5 * s).sum()
        return total, (0.5 * torch.exp(-s)).detach()


@WEIGHTERS.register("rlw")
class RandomLossWeighting(Weighter):
    """Random loss weighting (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I), drawn anew each step.

    Draws come from the weighter's own seeded generator (saved in its state), so every DDP rank draws the
    same weights and a resumed run draws the same sequence.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n)
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, losses: Sequence[float] | Tensor) -> Tensor:
        loss = _as_losses(losses, self.n, self.device)
        z = torch.randn(self.n, generator=self._gen)
        return torch.softmax(z, 0).to(loss.device, non_blocking=True)

    def get_extra_state(self) -> Tensor:
        return self._gen.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self._gen.set_state(state.cpu())


def make_weighter(spec: str | dict | Weighter, n: int, **defaults: object) -> Weighter:
    """A weighter for ``n`` branches from a name or ``{name = ..., **options}`` (``WEIGHTERS``); ``defaults``
    are options used unless the spec sets them (a preset's official settings). An unknown name or option
    is a one-line error listing the choices."""
    w = WEIGHTERS.build(spec, fixed={"n": n}, **defaults)
    if not isinstance(w, Weighter):
        raise TypeError(f"a weighter must be a multiteach Weighter, got {type(w).__name__}")
    if w.n != n:
        raise ValueError(f"the weighter is for {w.n} losses, the recipe has {n} branches")
    return w


__all__ = ["ANL", "DWA", "WEIGHTERS", "Fixed", "RandomLossWeighting", "StepContext", "UncertaintyWeighting",
           "Weighter", "make_weighter"]
