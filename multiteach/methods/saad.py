"""SAAD (Lee & Chung, TMLR 2026): sample-wise adaptive adversarial distillation. Samples whose adversarial
example the teacher finds uncertain (high entropy of T(x')) transfer from student to teacher; they are
up-weighted, the most confident ones get weight 0:

    w_i = 5 (H(T(x'_i)) - min_j H(T(x'_j))),   L = mean_i [ w_i (KL_i(T(x') || S(x')) + IGDM_i)
                                                          + beta (1 - w~_i) KL_i(T(x) || S(x)) ]

with w~ = w min-max normalised over the batch, IGDM the ramped term of :mod:`.igdm`, and x' from an attack on a
first-order model of the teacher around x. The weights are a registered weighter (``"saad"``) usable on any
preset's branches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import KLDistill
from ..recipe import Branch, Recipe
from ..registry import WEIGHTERS
from ..transforms import Clean, InputTransform
from ..weighting import StepContext, Weighter
from ._common import ModelLike, as_student, as_teacher, register
from .igdm import EpochRamp, Recorded, igdm_branch


def renyi_entropy(logits: Tensor, order: float = 1.0, eps: float = 1e-12) -> Tensor:
    """Per-sample Renyi entropy of softmax(logits) as the SAAD code computes it: order 1 (within 1e-6) is
    Shannon's -sum p log(p + eps); otherwise log(sum p^order + eps) / (1 - order)."""
    p = F.softmax(logits.float(), dim=1)
    if abs(order - 1.0) < 1e-6:
        return -(p * torch.log(p + eps)).sum(1)
    return torch.log(p.pow(order).sum(1) + eps) / (1.0 - order)


@WEIGHTERS.register("saad")
class SampleEntropyWeighting(Weighter):
    """SAAD's per-sample weights from the entropy H_i of the target of branch ``source`` (the teacher's
    logits on x'), over the batch (each rank's own, under DDP):

        w_i = clamp(scale * (H_i - min_j H_j), 0),    w~_i = (w_i - min w) / (max w - min w + 1e-8)
        W_ki = weights_k * w_i,   and for the branches in ``clean``:  W_ki = beta * weights_k * (1 - w~_i)

    Constants in the backward (the teacher's outputs are detached). ``order``: the Renyi order (1: Shannon)."""

    def __init__(self, n: int, source: int = 0, scale: float = 5.0, order: float = 1.0,
                 weights: Sequence[float] | None = None, clean: Sequence[int] = (), beta: float = 0.0) -> None:
        super().__init__(n)
        if not 0 <= source < n:
            raise ValueError(f"source = {source} is not a branch index (0..{n - 1})")
        if any(not 0 <= c < n for c in clean):
            raise ValueError(f"clean = {list(clean)} has an index outside 0..{n - 1}")
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"SampleEntropyWeighting has {len(weights)} weights for {n} branches")
        self.source, self.scale, self.order, self.beta = source, float(scale), float(order), float(beta)
        self.clean = tuple(int(c) for c in clean)
        self.register_buffer("weights", torch.tensor(weights))

    def sample_weights(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """(w, w~) for the teacher logits ``target`` (B, C)."""
        h = renyi_entropy(target.detach(), self.order)
        w = (self.scale * (h - h.min())).clamp_min(0.0)
        return w, (w - w.min()) / (w.max() - w.min() + 1e-8)

    def weigh(self, ctx: StepContext) -> Tensor:
        target = ctx.targets[self.source] if ctx.targets else None
        if target is None:
            raise ValueError(f"branch {self.source} has no teacher output to take SAAD's entropies from")
        w, w_norm = self.sample_weights(target)
        weights = self.weights.to(w.device).view(-1, 1)
        out = weights * w
        for c in self.clean:
            out[c] = self.beta * weights[c] * (1.0 - w_norm)
        return out

    def extra_repr(self) -> str:
        return (f"source={self.source}, scale={self.scale}, order={self.order}, clean={list(self.clean)}, "
                f"beta={self.beta}")


class LinearizedTeacherPGD(InputTransform):
    """SAAD's inner maximisation: PGD ascending KL(softmax(z(x')) || softmax(S(x'))) summed, where z(x') is the
    teacher's clean output T(x) with its true-class logit moved to its first-order value at x',

        z_y(x') = T_y(x) + lam * <grad_x T_y(x), x' - x>,

    so the gradient reaches x' through the student and through z. The teacher (``reference``; it runs once,
    fp32, for T(x) and its gradient) stays frozen; start x + sigma*N(0,1), not clamped, as the code; each step
    x' + alpha*sign(grad), projected to the eps-ball and [0, 1]; the student in eval mode."""

    graph_safe = False
    bn_mode = "eval"

    def __init__(self, teacher: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 lam: float = 1.0, sigma: float = 0.001) -> None:
        self.reference, self.needs_reference = teacher, False
        self.eps, self.alpha, self.steps, self.lam, self.sigma = float(eps), float(alpha), int(steps), float(lam), sigma

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        teacher = self.reference
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x0 = x.clone().requires_grad_(True)
            t = teacher(x0).float()
            (g,) = torch.autograd.grad(t.gather(1, y.view(-1, 1)).sum(), [x0])
        t, one_hot = t.detach(), F.one_hot(y, t.shape[1]).float()
        x_adv = x + self.sigma * torch.randn_like(x)
        with torch.enable_grad():
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                z = t + self.lam * (g * (x_adv - x)).flatten(1).sum(1, keepdim=True) * one_hot
                loss = F.kl_div(F.log_softmax(model(x_adv).float(), 1), F.softmax(z, 1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, [x_adv])
                x_adv = x_adv.detach() + self.alpha * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        return x_adv

    def __repr__(self) -> str:
        return (f"LinearizedTeacherPGD(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
                f"lam={self.lam})")


@register("saad", "SAAD, Lee & Chung 2026: per-sample weights 5 (H(T(x')) - min H) on KL(T(x')||S(x')) + IGDM",
          ("adv",), epochs=200, milestones=(100, 150))
def saad(student: ModelLike = "cifar_resnet18", adv_teacher: ModelLike | None = None, *, num_classes: int = 10,
         eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, lambda_inner: float = 1.0,
         entropy_scale: float = 5.0, gamma: float = 1.0, beta: float = 0.0, igdm_alpha: float | None = None,
         epochs: int = 200) -> Recipe:
    """SAAD (HongsinLee/saad, ``saad.py`` run by ``main.sh``): x' from :class:`LinearizedTeacherPGD` (PGD-10,
    step 2/255, eps 8/255, lambda_inner = 1), d = x' - x, then per sample

        w_i * ( KL_i(T(x') || S(x')) + igdm_alpha * (e/E) * KL_i(T(x') - T(x-d) || S(x') - S(x-d)) )
            + beta * (1 - w~_i) * KL_i(T(x) || S(x)),      averaged over the batch,

    w from :class:`SampleEntropyWeighting` on T(x'), scale 5, Renyi order ``gamma`` = 1 (Shannon; main.sh),
    beta = 0 (main.sh: the clean term is off, but S(x) is still forwarded, as the code, which moves the BN
    running statistics); every KL summed over classes at T = 1; x + d is x' itself and S(x'), T(x') are shared
    by the KL and IGDM terms, as the code. igdm_alpha: 1 on CIFAR-10, 10 otherwise (the code's comment;
    ``None`` picks it from ``num_classes``); e counts epochs from 1, E = ``epochs``. The code's
    ``--entropy_scale`` option is not read (it writes 5); ``entropy_scale`` here is that 5. Not reproduced:
    the code evaluates and saves an SWA average of the weights from epoch 95 (BN statistics recomputed); the
    trainer's ``ema_decay`` is the nearest option. Schedule: 200 epochs, SGD 0.1, momentum 0.9, weight decay
    2e-4, batch 128, x0.1 after epochs 100 and 150. Teacher (main.sh): Gowal2021Improving_28_10_ddpm_100m."""
    teacher = as_teacher(adv_teacher, num_classes, "adv")
    ramp = (1.0 if num_classes == 10 else 10.0) if igdm_alpha is None else igdm_alpha
    source = Recorded(LinearizedTeacherPGD(teacher, eps, alpha, steps, lambda_inner))
    branches = [
        Branch(source, KLDistill(1.0, "batchmean"), teacher=teacher, name="adv_kl"),
        igdm_branch(teacher, source, share_adversarial=True),
        Branch(Clean(), KLDistill(1.0, "batchmean"), teacher=teacher, name="nat_kl"),
    ]
    weights = SampleEntropyWeighting(3, source=0, scale=entropy_scale, order=gamma, clean=(2,), beta=beta)
    return Recipe(as_student(student, num_classes), branches, EpochRamp(weights, 3, 1, ramp, epochs), name="saad")


__all__ = ["LinearizedTeacherPGD", "SampleEntropyWeighting", "renyi_entropy", "saad"]
