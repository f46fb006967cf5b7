"""Input transforms: what a branch feeds to the student and its teacher (clean images, PGD, FGSM, ...).

A transform is a callable ``t(model, x, y, reference=None) -> x'``, like a torchattacks attack, so training
attacks and evaluation attacks are the same code. The base class owns the contract every transform keeps
(as torchattacks' ``Attack`` does in its ``__call__``): the attacked model runs in the transform's ``bn_mode``
and every submodule's own mode is restored afterwards; the output is detached; attacks differentiate with
respect to the input only (``torch.autograd.grad``), so no gradient reaches any weight. A subclass writes one
algorithm, ``perturb``. A plain callable ``(model, x, y) -> x'`` and torchattacks attacks are accepted through
:func:`as_transform`. In a :class:`~multiteach.Recipe`, branches that share a transform instance share its
output within a step: one attack, however many branches read it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cw_margin
from .registry import ATTACKS

Norm = Literal["Linf", "L2"]
Start = Literal["uniform", "normal", "none"]
Objective = Literal["ce", "kl", "cw"]
BNMode = Literal["eval", "train", "keep"]


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Put ``model`` in train or eval mode for the block, then restore every submodule's own flag."""
    if mode == "keep":
        yield model
        return
    saved = [m.training for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in zip(model.modules(), saved):
            m.training = flag


class InputTransform:
    """Base class: maps a clean batch to the input of a branch.

    ``model``: the network to attack (``None``: the recipe's student). ``reference``: for objectives that
    compare to a reference output (KL), the module whose clean output is that reference (``None``: the
    attacked model itself, as in TRADES). ``through``: a module whose output on the *perturbed* input is the
    reference at every step (AdaAD: the attack runs through the teacher; gradients reach the input only).
    ``bn_mode``: the attacked model's mode while ``perturb`` runs. ``graph_safe``: the transform may be recorded
    once and replayed as a CUDA graph (fixed shapes, no host syncs, its randomness from torch's CUDA generator);
    the fast path re-records it when its settings (``settings()``) change.
    """

    model: nn.Module | None = None
    reference: nn.Module | None = None
    through: nn.Module | None = None
    needs_reference: bool = False
    bn_mode: BNMode = "keep"
    graph_safe: bool = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        x = x.detach()
        with module_mode(model, self.bn_mode):
            out = self.perturb(model, x, y, reference)
        return out.detach()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement perturb(model, x, y, reference)")

    def settings(self) -> dict[str, Any]:
        """The plain-valued settings (eps, alpha, steps, ...): a recorded graph is stale when they change."""
        return {k: v for k, v in vars(self).items() if isinstance(v, int | float | str | bool | None)}

    def describe(self) -> str:
        return repr(self)


@ATTACKS.register("clean")
class Clean(InputTransform):
    """The clean batch, unchanged."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        return x

    def __repr__(self) -> str:
        return "Clean()"


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def check_linf_eps(eps: float) -> None:
    """An L-inf radius above 1 on [0, 1] images is almost surely a radius in pixel units (8 for 8/255)."""
    if eps > 1:
        raise ValueError(f"L-inf eps {eps:g} > 1: images are in [0, 1], so it allows any image; did you mean "
                         f"{eps:g}/255 = {eps / 255:.6f}?")


@ATTACKS.register("pgd")
class PGD(InputTransform):
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball, inside [0, 1].

    ``start``: ``"uniform"`` (a random point of the ball), ``"normal"`` (x + sigma*N(0,1), sigma = 0.001 as in
    TRADES/RSLAD/MTARD) or ``"none"``. ``objective``: ``"ce"`` to the label, ``"kl"`` to a reference output
    (TRADES, RSLAD), ``"cw"`` (Carlini-Wagner margin). ``bn_mode``: the attacked model's mode during the
    attack (``"eval"`` in MTARD/RSLAD/TRADES, ``"train"`` in ARD); its mode is restored afterwards.
    ``through``: ascend the KL to that module's output on the perturbed input (AdaAD, with ``objective="kl"``).
    """

    @property
    def graph_safe(self) -> bool:  # type: ignore[override]
        """Recordable, unless the attacked model's mode is left as found (``bn_mode="keep"``: the mode at
        recording would be replayed) or a subclass overrides ``observe`` (a side effect that a graph runs once)
        without declaring ``graph_safe`` itself."""
        return self.bn_mode != "keep" and type(self).observe is PGD.observe

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        norm: Norm = "Linf",
        start: Start = "uniform",
        sigma: float = 0.001,
        objective: Objective = "ce",
        bn_mode: BNMode = "eval",
        model: nn.Module | None = None,
        reference: nn.Module | None = None,
        cw_kappa: float = 50.0,
        through: nn.Module | None = None,
    ) -> None:
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be >= 0 and finite, got {eps}")
        if not math.isfinite(alpha) or (alpha <= 0 and eps > 0):
            raise ValueError(f"step size alpha must be > 0 and finite, got {alpha}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for name, value, allowed in (
            ("norm", norm, ("Linf", "L2")), ("start", start, ("uniform", "normal", "none")),
            ("objective", objective, ("ce", "kl", "cw")), ("bn_mode", bn_mode, ("eval", "train", "keep")),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: use one of {allowed}")
        if norm == "Linf":
            check_linf_eps(eps)
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.norm: Norm = norm
        self.start: Start = start
        self.sigma = sigma
        self.objective: Objective = objective
        self.bn_mode: BNMode = bn_mode
        self.model = model
        self.reference = reference
        self.through = through
        self.needs_reference = objective == "kl" and through is None
        self.cw_kappa = cw_kappa
        if through is not None and objective != "kl":
            raise ValueError("an attack through a module (through=...) ascends the KL to its output: use "
                             "objective='kl'")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
            f"norm={self.norm!r}, start={self.start!r}, objective={self.objective!r}, bn_mode={self.bn_mode!r})"
        )

    def describe(self) -> str:
        """Short settings for tables: norm, eps, step, steps, start, objective."""
        scale = 255 if self.norm == "Linf" else 1
        unit = "/255" if self.norm == "Linf" else ""
        return (f"{self.norm} eps {self.eps * scale:.3g}{unit}, step {self.alpha * scale:.3g}{unit} x{self.steps}, "
                f"{self.start} start, {self.objective}")

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        if self.norm == "Linf":
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        else:
            delta = x_adv - x
            delta = delta * (self.eps / _per_sample_norm(delta)).clamp(max=1.0)
            x_adv = x + delta
        return x_adv.clamp(0.0, 1.0)

    def _init(self, x: Tensor) -> Tensor:
        if self.start == "none" or self.eps == 0:
            return x.clone()
        if self.start == "normal":
            return self._project(x + self.sigma * torch.randn_like(x), x)
        if self.norm == "Linf":
            return (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0.0, 1.0)
        direction = torch.randn_like(x)
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return self._project(x + direction / _per_sample_norm(direction) * radius * self.eps, x)

    def objective_value(self, logits: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        """The summed per-sample objective the attack ascends."""
        logits = logits.float()
        if self.objective == "ce":
            return F.cross_entropy(logits, y, reduction="sum")
        if self.objective == "cw":
            return cw_margin(logits, y, self.cw_kappa).sum()
        assert reference is not None
        return F.kl_div(F.log_softmax(logits, 1), F.softmax(reference.float(), 1), reduction="sum")

    def _step(self, x_adv: Tensor, grad: Tensor) -> Tensor:
        if self.norm == "Linf":
            return x_adv + self.alpha * grad.sign()
        return x_adv + self.alpha * grad / _per_sample_norm(grad)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        if self.eps == 0:
            return x
        with torch.enable_grad():
            if self.needs_reference and reference is None:
                with torch.no_grad():
                    reference = model(x)
            x_adv = self._init(x)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                self.observe(logits.detach(), y)
                ref = self.through(x_adv) if self.through is not None else reference
                (grad,) = torch.autograd.grad(self.objective_value(logits, y, ref), [x_adv])
                x_adv = self._project(self._step(x_adv.detach(), grad), x)
        return x_adv

    def observe(self, logits: Tensor, y: Tensor) -> None:
        """Called with the attacked model's (detached) logits at each iterate before its step: a subclass
        that records per-sample statistics of the attack (Fair-ARD's surviving steps) overrides it."""


@ATTACKS.register("fgsm")
class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps from the clean point.

    With ``start="uniform"`` and ``alpha=1.25*eps`` it is the FGSM-RS of fast adversarial training
    (Wong et al. 2020).
    """

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None, start: Start = "none", **kwargs) -> None:
        super().__init__(eps=eps, alpha=eps if alpha is None else alpha, steps=1, start=start, **kwargs)


class NFGSM(InputTransform):
    """N-FGSM (de Jorge et al., NeurIPS 2022; pdejorge/N-FGSM): one signed-gradient step of ``alpha`` (default
    eps) on CE from x + U(-k eps, k eps), k = 2, kept in [0, 1] but not projected back to the eps-ball (noise and
    step together reach up to 3 eps): single-step adversarial training without catastrophic overfitting, at one
    gradient pass per batch. ``clip``: project to ``clip`` x eps (Fast AT's 1; None: none, as N-FGSM). The
    official code attacks the model as it trains: ``bn_mode="train"`` (BatchNorm on the batch, its running
    statistics updated by the attack's forward)."""

    @property
    def graph_safe(self) -> bool:  # type: ignore[override]
        """Recordable, unless the model's mode is left as found (``bn_mode="keep"``), as :class:`PGD`."""
        return self.bn_mode != "keep"

    def __init__(self, eps: float = 8 / 255, k: float = 2.0, alpha: float | None = None, clip: float | None = None,
                 bn_mode: BNMode = "train") -> None:
        if not math.isfinite(eps) or eps < 0 or k < 0 or (clip is not None and clip <= 0):
            raise ValueError(f"N-FGSM needs eps >= 0, k >= 0 and clip > 0 (or None), got {eps}, {k}, {clip}")
        if bn_mode not in ("eval", "train", "keep"):
            raise ValueError(f"unknown bn_mode {bn_mode!r}: use one of ('eval', 'train', 'keep')")
        check_linf_eps(eps)
        self.eps, self.k, self.alpha = float(eps), float(k), float(eps if alpha is None else alpha)
        self.clip = None if clip is None else float(clip)
        self.bn_mode: BNMode = bn_mode

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        with torch.enable_grad():
            start = (x + torch.empty_like(x).uniform_(-self.k * self.eps, self.k * self.eps)).clamp(0.0, 1.0)
            start.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(start).float(), y, reduction="sum"), [start])
        x_adv = start.detach() + self.alpha * grad.sign()
        if self.clip is not None:
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.clip * self.eps), x + self.clip * self.eps)
        return x_adv.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (f"NFGSM(eps={self.eps:.5g}, k={self.k:g}, alpha={self.alpha:.5g}, clip={self.clip}, "
                f"bn_mode={self.bn_mode!r})")

    def describe(self) -> str:
        clip = f"clip {self.clip:g} eps" if self.clip is not None else "no projection"
        return f"Linf eps {self.eps * 255:.3g}/255, noise U(+-{self.k:g} eps), step {self.alpha * 255:.3g}/255, {clip}"


class WrappedTransform(InputTransform):
    """A transform standing in for another (``inner``): settings read and written on it are the inner one's,
    and so is the contract the recipe reads (``model``, ``reference``, ``through``, ``bn_mode``). Subclasses
    override ``__call__`` (a recorded graph, a transform that keeps its last output)."""

    def __init__(self, inner: InputTransform) -> None:
        self.__dict__["inner"] = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    model = property(lambda self: self.inner.model)  # type: ignore[assignment]
    reference = property(lambda self: self.inner.reference)  # type: ignore[assignment]
    through = property(lambda self: self.inner.through)  # type: ignore[assignment]
    needs_reference = property(lambda self: self.inner.needs_reference)  # type: ignore[assignment]
    bn_mode = property(lambda self: self.inner.bn_mode)  # type: ignore[assignment]


class CallableTransform(InputTransform):
    """Any callable ``fn(model, x, y) -> x'`` as a transform (the base class keeps the mode contract)."""

    def __init__(self, fn: Callable[[nn.Module, Tensor, Tensor], Tensor], bn_mode: BNMode = "eval") -> None:
        self.fn, self.bn_mode = fn, bn_mode

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        return self.fn(model, x, y)

    def __repr__(self) -> str:
        return f"CallableTransform({getattr(self.fn, '__name__', type(self.fn).__name__)})"


class TorchattacksTransform(InputTransform):
    """A torchattacks attack as a transform: ``TorchattacksTransform(torchattacks.PGD, eps=8/255, steps=10)``
    builds the attack for each model it is asked to attack (the recipe's student), or wraps a built one and
    points it at that model (``set_model``)."""

    def __init__(self, attack: Any, bn_mode: BNMode = "eval", **options: Any) -> None:
        self.attack, self.options, self.bn_mode = attack, options, bn_mode
        self._built: dict[int, Any] = {}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        if isinstance(self.attack, type):
            atk = self._built.get(id(model))
            if atk is None:
                atk = self._built[id(model)] = self.attack(model, **self.options)
        else:
            atk = self.attack
            if atk.model is not model:
                atk.set_model(model)
        with torch.enable_grad():
            return atk(x, y)

    def __repr__(self) -> str:
        name = self.attack.__name__ if isinstance(self.attack, type) else type(self.attack).__name__
        return f"TorchattacksTransform({name})"


def as_transform(t: Any) -> InputTransform:
    """An :class:`InputTransform` as it is; a torchattacks attack or a callable ``(model, x, y) -> x'`` wrapped."""
    if isinstance(t, InputTransform):
        return t
    if type(t).__module__.split(".")[0] == "torchattacks":
        return TorchattacksTransform(t)
    if callable(t):
        return CallableTransform(t)
    raise TypeError(f"a branch's transform must be an InputTransform or a callable (model, x, y) -> x', got "
                    f"{type(t).__name__}")


__all__ = ["ATTACKS", "FGSM", "NFGSM", "PGD", "CallableTransform", "Clean", "InputTransform", "TorchattacksTransform",
           "WrappedTransform", "as_transform", "module_mode"]
