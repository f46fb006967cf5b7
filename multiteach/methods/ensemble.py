"""Generic multi-teacher knowledge distillation (no attack, any dataset): AVER, EBKD, CA-MKD and AE-KD.

Each preset trains the student on clean images with CE(S(x), y) plus the Hinton KD term of every teacher,

    L = ce_weight CE(S(x), y) + kd_weight sum_k mean_b W_kb T^2 KL(softmax(T_k(x_b)/T) || softmax(S(x_b)/T))

at T = 4 (KL summed over classes, batch mean), the methods differing only in the teacher weights W (and CA-MKD
adding a feature term). The settings are those of Rorozhl/CA-MKD, whose repository runs all four methods in
one loop (``scripts/run.sh``), and of AnTuo1998/AE-KD for AE-KD: SGD lr 0.05 (0.01 for MobileNetV2/ShuffleNet
students), momentum 0.9, Nesterov, weight decay 5e-4, batch 64, 240 epochs with the LR x0.1 at 150, 180, 210.

The presets are registered with three teacher roles, ``t1``, ``t2``, ``t3`` (the papers' common setup);
the ``*_teachers`` functions take a list of any number of teachers. The weighters are registered in
``WEIGHTERS`` (``ebkd``, ``ca_mkd``, ``aekd``) and weigh all the branches they are given, each a KD branch
to one teacher: ``multi_teacher(student, [(Clean(), t) for t in teachers], weighter="ebkd")`` uses them
directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import capture, feature_shapes
from ..losses import CrossEntropy, KLDistill, entropy_per_sample
from ..recipe import Branch, Recipe
from ..registry import WEIGHTERS
from ..teachers import Teacher
from ..transforms import Clean, module_mode
from ..weighting import Fixed, StepContext, Weighter
from ._common import ModelLike, WeighterSpec, as_student, as_teacher, register, weighter_for

SCHEDULE = {"epochs": 240, "milestones": (150, 180, 210)}
ROLES = ("t1", "t2", "t3")
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- weighters
def _teacher_logits(ctx: StepContext, i: int, who: str) -> Tensor:
    t = ctx.targets[i] if i < len(ctx.targets) else None
    if t is None or t.dim() != 2:
        raise ValueError(f"{who} weighs KD branches: branch {i} has no teacher logits as its target")
    return t


@WEIGHTERS.register("ebkd")
class EntropyWeights(Weighter):
    """EBKD (Kwon et al., ICASSP 2020), per sample: the teacher whose prediction is the more certain weighs more,

        w_kb = 1 - H(softmax(T_k(x_b))) / sum_j H(softmax(T_j(x_b)))        (T = 1; they sum to n - 1)

    as Rorozhl/CA-MKD implements it (``--ensemble_method EBKD``; the paper, on speech, has no public code)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        if n < 2:
            raise ValueError(f"EBKD weighs at least two teachers, got n={n}")

    def weigh(self, ctx: StepContext) -> Tensor:
        h = torch.stack([entropy_per_sample(_teacher_logits(ctx, i, "ebkd")) for i in range(self.n)])
        return 1.0 - h / h.sum(0, keepdim=True).clamp_min(1e-12)


@WEIGHTERS.register("ca_mkd")
class ConfidenceWeights(Weighter):
    """CA-MKD (Zhang et al., ICASSP 2022), per sample: the teacher closer to the label weighs more,

        w_kb = (1 - softmax_k(CE_kb)) / (n - 1),     CE_kb = CE(T_k(x_b), y_b)     (they sum to 1)

    ``scores``: modules whose ``teacher_ce`` (B,) replaces CE_kb (:class:`ConfidenceHint`: CA-MKD's feature
    term scores each teacher's head on the student's projected feature); those weights are differentiable,
    as in the code, which back-propagates the weighted sum through them into the projectors and the student."""

    def __init__(self, n: int, scores: Sequence[nn.Module] | None = None) -> None:
        super().__init__(n)
        if n < 2:
            raise ValueError(f"CA-MKD weighs at least two teachers, got n={n}")
        if scores is not None and len(scores) != n:
            raise ValueError(f"ConfidenceWeights has {len(scores)} scores for {n} branches")
        self.scores = tuple(scores) if scores is not None else None  # a tuple: not registered (not its state)
        self.differentiable = scores is not None

    def weigh(self, ctx: StepContext) -> Tensor:
        if self.scores is not None:
            ce = torch.stack([s.teacher_ce for s in self.scores])
        else:
            ce = torch.stack([F.cross_entropy(_teacher_logits(ctx, i, "ca_mkd").float(), ctx.y, reduction="none")
                              for i in range(self.n)])
        return (1.0 - torch.softmax(ce.float(), 0)) / (self.n - 1)


def capped_min_norm(gram: Tensor, cap: float, faces: Tensor | None = None) -> Tensor:
    """argmin_w w^T G w subject to sum_k w_k = 1 and 0 <= w_k <= cap, for a small Gram matrix G (K, K).

    Exact: on each face of the box (every coordinate at 0, free, or at the cap; ``faces`` (P, K) codes 0, 1, 2)
    the equality-constrained minimum solves one linear system; all 3^K are solved at once (float64, a
    pseudo-inverse for singular faces) and the feasible point of least value wins, the face with the most free
    coordinates on ties (uniform weights when G = 0). No host sync."""
    k = gram.shape[0]
    faces = _faces(k, gram.device) if faces is None else faces
    g = gram.double()
    g = g / g.diagonal().max().clamp_min(1e-300)  # scale-free: the minimiser does not depend on |G|
    free = faces == 1
    fixed = (faces == 2).double() * cap
    p = faces.shape[0]
    eye = torch.eye(k, dtype=g.dtype, device=g.device).expand(p, k, k)
    m = torch.zeros(p, k + 1, k + 1, dtype=g.dtype, device=g.device)
    m[:, :k, :k] = torch.where(free[:, :, None], g.expand(p, k, k), eye)  # free rows: G w + lambda = 0
    m[:, :k, k] = free.double()
    m[:, k, :k] = 1.0  # sum w = 1
    rhs = torch.cat([fixed, torch.ones(p, 1, dtype=g.dtype, device=g.device)], 1)
    x = (torch.linalg.pinv(m) @ rhs.unsqueeze(2)).squeeze(2)
    w = x[:, :k]
    residual = (m @ x.unsqueeze(2)).squeeze(2) - rhs
    feasible = (residual.abs().amax(1) < 1e-8) & (w >= -1e-10).all(1) & (w <= cap + 1e-10).all(1)
    value = torch.einsum("pi,ij,pj->p", w, g, w).masked_fill(~feasible, float("inf"))
    return w[value.argmin()].clamp(0.0, cap)


def _faces(k: int, device: torch.device | str = "cpu") -> Tensor:
    """Every assignment of K coordinates to {0: at zero, 1: free, 2: at the cap}, most free coordinates first."""
    faces = torch.tensor(list(itertools.product((1, 0, 2), repeat=k)), dtype=torch.long)
    order = torch.argsort((faces == 1).sum(1), descending=True, stable=True)
    return faces[order].to(device)


@WEIGHTERS.register("aekd")
class GradientMinNorm(Weighter):
    """AE-KD (Du et al., NeurIPS 2020), as AnTuo1998/AE-KD computes it: g_k is the gradient of teacher k's KD
    loss with respect to the student's logits, averaged over the batch (one row of C numbers per teacher);
    the weights are the least-norm point of their convex hull, each weight capped by the tolerance C = 0.6:

        w = argmin_w || sum_k w_k g_k ||^2    s.t.  sum_k w_k = 1,  0 <= w_k <= C        (C clipped to [1/n, 1])

    the dual of the code's one-class SVM on the Gram matrix (nu = 1/(C n); weights = dual_coef / (n nu)),
    solved exactly in torch by :func:`capped_min_norm` (no sklearn). ``normalize`` (its ``--svm_norm``, off by
    default): unit gradients, then the weights divided by the gradients' norms and renormalised. ``losses``:
    each branch's per-sample loss to differentiate (default: KL at ``temperature``; a scale common to all
    branches cancels). Under DDP the gradients are averaged over the ranks first."""

    max_teachers = 10  # 3^n faces

    def __init__(self, n: int, tolerance: float = 0.6, normalize: bool = False, temperature: float = 4.0,
                 losses: Sequence[LossFn] | None = None) -> None:
        super().__init__(n)
        if not 0 < tolerance:
            raise ValueError(f"AE-KD tolerance C must be > 0, got {tolerance}")
        if n > self.max_teachers:
            raise ValueError(f"AE-KD solves its weights over 3^n faces: at most {self.max_teachers} teachers, got {n}")
        if losses is not None and len(losses) != n:
            raise ValueError(f"GradientMinNorm has {len(losses)} losses for {n} branches")
        self.tolerance, self.normalize, self.temperature = float(tolerance), normalize, float(temperature)
        kl = KLDistill(temperature, "batchmean", temperature_squared=True)
        self.losses = tuple(losses) if losses is not None else (kl,) * n  # a tuple: not registered
        self.cap = min(max(self.tolerance, 1.0 / n), 1.0)  # the code clips nu = 1/(C n) to [1/n, 1]
        self.register_buffer("faces", _faces(n), persistent=False)

    def gradients(self, ctx: StepContext) -> Tensor:
        """(n, C): each branch loss's gradient with respect to the student's logits, averaged over the batch."""
        rows = []
        with torch.enable_grad():
            for i, loss in enumerate(self.losses):
                s = ctx.student[i].detach().float().requires_grad_(True)
                value = loss(s, _teacher_logits(ctx, i, "aekd").float(), ctx.y).float().mean()
                rows.append(torch.autograd.grad(value, s)[0].mean(0))
        g = torch.stack(rows)
        return g if ctx.sync is None else ctx.sync(g)

    def weigh(self, ctx: StepContext) -> Tensor:
        g = self.gradients(ctx).double()
        norms = g.norm(dim=1).clamp_min(1e-300)
        if self.normalize:
            g = g / norms[:, None]
        w = capped_min_norm(g @ g.T, self.cap, self.faces)
        if self.normalize:
            w = w / norms
            w = w / w.sum()
        return w.float()

    def extra_repr(self) -> str:
        return f"n={self.n}, tolerance={self.tolerance}, normalize={self.normalize}"


class Group(NamedTuple):
    """Consecutive branches weighed by one weighter, times ``scale`` (0 before epoch ``from_epoch``)."""

    weighter: Weighter
    scale: float = 1.0
    from_epoch: int = 0


class Groups(Weighter):
    """Weights for consecutive groups of branches, each from its own weighter reading its slice of the step
    (losses, outputs, targets), times the group's scale: e.g. CE at 1 beside the teachers' KD terms weighted by
    EBKD times kd_weight / K. Batch-level groups are spread over the samples when another is per-sample."""

    def __init__(self, groups: Sequence[Group | tuple]) -> None:
        groups = [Group(*g) for g in groups]
        super().__init__(sum(g.weighter.n for g in groups))
        for g in groups:
            if type(g.weighter).combine is not Weighter.combine:
                raise ValueError(f"{type(g.weighter).__name__} combines its losses itself: it cannot be a group")
        self.parts = nn.ModuleList([g.weighter for g in groups])
        self.differentiable = any(g.weighter.differentiable for g in groups)
        self.scales = [float(g.scale) for g in groups]
        self.from_epochs = [int(g.from_epoch) for g in groups]

    def weigh(self, ctx: StepContext) -> Tensor:
        out, start = [], 0
        for w, scale, from_epoch in zip(self.parts, self.scales, self.from_epochs):
            part = slice(start, start + w.n)
            sub = StepContext(ctx.losses[part], ctx.y, ctx.student[part], ctx.targets[part], ctx.epoch, ctx.sync)
            weights = w.weigh(sub).float()
            out.append((weights if w.differentiable else weights.detach()) * (scale if ctx.epoch >= from_epoch
                                                                                 else 0.0))
            start += w.n
        if any(o.dim() == 2 for o in out):
            batch = ctx.losses.shape[1]
            out = [o if o.dim() == 2 else o[:, None].expand(-1, batch) for o in out]
        return torch.cat(out)

    def on_lr(self, ratio: float) -> None:
        for w in self.parts:
            w.on_lr(ratio)

    def on_epoch_end(self) -> None:
        for w in self.parts:
            w.on_epoch_end()

    def extra_repr(self) -> str:
        return f"scales={self.scales}, from_epochs={self.from_epochs}"


# ----------------------------------------------------------------------------- CA-MKD's feature term
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.Flatten, nn.Dropout,
          nn.Identity)


def _head(classifier: nn.Module, feature: Tensor, relu: bool) -> Tensor:
    f = F.relu(feature) if relu else feature
    return classifier(F.adaptive_avg_pool2d(f, 1).flatten(1))


def final_feature(model: nn.Module, layer: str | None = None) -> tuple[str, bool]:
    """(layer, relu): the model's last feature map, the one its classifier reads through global average
    pooling: ``avgpool(relu?(output of layer))`` is the classifier's input (checked on a probe input). By
    default the last top-level layer before the classifier that is not a pooling, flatten or dropout
    (``layer3`` of a CIFAR ResNet-20, ``bn1`` of a WRN and ``bn2`` of MobileNetV2, whose ReLU is functional)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_classifier(): CA-MKD's feature term needs the "
                         "teacher's classifier (a timm model, or set feature_weight=0)")
    if layer is None:
        names = [n for n, m in model.named_children() if m is not classifier and not isinstance(m, _POOLS)
                 and "pool" not in type(m).__name__.lower()]
        layer = names[-1]
    p = next(model.parameters())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(p)
    seen: list[Tensor] = []
    hook = classifier.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad(), module_mode(model, "eval"), capture(model, [layer]) as feats:
            model(x)
    finally:
        hook.remove()
    f, read = feats[layer], seen[-1].flatten(1)
    for relu in (False, True):
        pooled = F.adaptive_avg_pool2d(F.relu(f) if relu else f, 1).flatten(1) if f.dim() == 4 else None
        if pooled is not None and pooled.shape == read.shape and \
                torch.allclose(pooled, read, rtol=1e-4, atol=1e-5 * float(read.abs().max())):
            return layer, relu
    raise ValueError(f"{type(model).__name__}: its classifier does not read the average-pooled output of {layer!r}: "
                     "pass the layer whose output it pools (its last feature map) as student_layer/teacher_layers; "
                     "a model whose head pools otherwise (cifar_airbench's global max-pool) takes feature_weight=0")


class ConfidenceHint(nn.Module):
    """CA-MKD's feature term for one teacher (Rorozhl/CA-MKD ``CalWeight`` and ``CAMKD``): the student's last
    feature map, resized to the teacher's (adaptive average pooling, or bilinear upsampling when smaller) and
    projected by a 1x1 convolution + BN + ReLU (its ``Embed``), against the teacher's last feature map:

        L_b = mean over (C, H, W) of (proj(f_S) - f_T)^2

    The teacher's head (global pooling + its classifier) on the projected student feature gives
    CE(head_T(proj(f_S)), y) per sample, kept (with its gradient) in ``teacher_ce``: what
    :class:`ConfidenceWeights` turns into this teacher's feature weight. ``student_relu`` / ``teacher_relu``:
    the captured layer is a final BN whose ReLU the model applies functionally (see :func:`final_feature`)."""

    def __init__(self, student_channels: int, teacher_channels: int, classifier: nn.Module,
                 student_relu: bool = False, teacher_relu: bool = False) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1),
                                       nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True))
        self._classifier = (classifier,)  # the teacher's: frozen, not this module's state
        self.student_relu, self.teacher_relu = student_relu, teacher_relu
        self.teacher_ce: Tensor | None = None

    def project(self, student_feature: Tensor, size: tuple[int, int]) -> Tensor:
        f = F.relu(student_feature) if self.student_relu else student_feature
        if f.shape[2] >= size[0]:
            f = F.adaptive_avg_pool2d(f, size)
        else:
            f = F.interpolate(f, size=size, mode="bilinear")
        return self.projector(f)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor | None, y: Tensor) -> Tensor:
        if teacher_feature is None:
            raise ValueError("ConfidenceHint needs a teacher feature on its branch (set the branch's teacher_layer)")
        t = F.relu(teacher_feature) if self.teacher_relu else teacher_feature
        s = self.project(student_feature, (t.shape[2], t.shape[3]))
        self.teacher_ce = F.cross_entropy(_head(self._classifier[0], s, False).float(), y, reduction="none")
        return (s.float() - t.float()).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- presets
def _teachers(teachers: Sequence[ModelLike | None], num_classes: int, least: int = 1) -> list[Teacher]:
    if len(teachers) < least:
        raise ValueError(f"this method needs at least {least} teachers, got {len(teachers)}")
    return [as_teacher(t, num_classes, f"t{k + 1}") for k, t in enumerate(teachers)]


def _kd_branches(teachers: Sequence[Teacher], temperature: float) -> list[Branch]:
    return [Branch(Clean(), KLDistill(temperature, "batchmean", temperature_squared=True), teacher=t,
                   name=f"kd_t{k + 1}") for k, t in enumerate(teachers)]


def _logit_ensemble(student: ModelLike, teachers: list[Teacher], weighter: Weighter, kd_scale: float,
                    temperature: float, ce_weight: float, num_classes: int, name: str) -> Recipe:
    branches = [Branch(Clean(), CrossEntropy(), name="ce"), *_kd_branches(teachers, temperature)]
    groups = Groups([Group(Fixed([ce_weight]), 1.0), Group(weighter, kd_scale)])
    return Recipe(as_student(student, num_classes), branches, groups, name=name)


def avg_kd_teachers(student: ModelLike, teachers: Sequence[ModelLike], *, num_classes: int = 10,
                    temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    weighter: WeighterSpec = "fixed") -> Recipe:
    """:func:`avg_kd` for any number of teachers."""
    ts = _teachers(teachers, num_classes)
    return _logit_ensemble(student, ts, weighter_for(weighter, len(ts), "fixed"), kd_weight, temperature,
                           ce_weight, num_classes, "avg_kd")


def ebkd_teachers(student: ModelLike, teachers: Sequence[ModelLike], *, num_classes: int = 10,
                  temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0) -> Recipe:
    """:func:`ebkd` for any number (>= 2) of teachers."""
    ts = _teachers(teachers, num_classes, least=2)
    return _logit_ensemble(student, ts, EntropyWeights(len(ts)), kd_weight / len(ts), temperature, ce_weight,
                           num_classes, "ebkd")


def aekd_teachers(student: ModelLike, teachers: Sequence[ModelLike], *, num_classes: int = 10,
                  temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 0.9, tolerance: float = 0.6,
                  normalize: bool = False) -> Recipe:
    """:func:`aekd` for any number of teachers (at most 10)."""
    ts = _teachers(teachers, num_classes)
    kd = _kd_branches(ts, temperature)
    w = GradientMinNorm(len(ts), tolerance, normalize, temperature, losses=[b.loss for b in kd])
    branches = [Branch(Clean(), CrossEntropy(), name="ce"), *kd]
    return Recipe(as_student(student, num_classes), branches,
                  Groups([Group(Fixed([ce_weight]), 1.0), Group(w, kd_weight)]), name="aekd")


def ca_mkd_teachers(student: ModelLike, teachers: Sequence[ModelLike], *, num_classes: int = 10,
                    temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    feature_weight: float = 50.0, feature_from_epoch: int = 1, student_layer: str | None = None,
                    teacher_layers: Sequence[str | None] | None = None) -> Recipe:
    """:func:`ca_mkd` for any number (>= 2) of teachers; ``teacher_layers``: one per teacher (None: its last
    feature map)."""
    ts = _teachers(teachers, num_classes, least=2)
    net = as_student(student, num_classes)
    k = len(ts)
    branches = [Branch(Clean(), CrossEntropy(), name="ce"), *_kd_branches(ts, temperature)]
    groups = [Group(Fixed([ce_weight]), 1.0), Group(ConfidenceWeights(k), kd_weight / k)]
    if feature_weight:
        layers = list(teacher_layers) if teacher_layers is not None else [None] * k
        if len(layers) != k:
            raise ValueError(f"teacher_layers has {len(layers)} names for {k} teachers")
        s_layer, s_relu = final_feature(net, student_layer)
        s_channels = feature_shapes(net, [s_layer])[s_layer][0]
        hints = []
        for i, (t, t_layer) in enumerate(zip(ts, layers)):
            t_layer, t_relu = final_feature(t.model, t_layer)
            t_channels = feature_shapes(t.model, [t_layer])[t_layer][0]
            hint = ConfidenceHint(s_channels, t_channels, t.model.get_classifier(), s_relu, t_relu)
            hints.append(hint.to(next(net.parameters())))
            branches.append(Branch(Clean(), hint, teacher=t, student_layer=s_layer, teacher_layer=t_layer,
                                   name=f"feat_t{i + 1}"))
        groups.append(Group(ConfidenceWeights(k, scores=hints), feature_weight / k, feature_from_epoch))
    return Recipe(net, branches, Groups(groups), name="ca_mkd")


@register("avg_kd", "AVER-MKD: CE + the mean of the teachers' KD terms (T = 4), three teachers t1, t2, t3", ROLES,
          **SCHEDULE)
def avg_kd(student: ModelLike = "cifar_resnet18", t1_teacher: ModelLike | None = None,
           t2_teacher: ModelLike | None = None, t3_teacher: ModelLike | None = None, *, num_classes: int = 10,
           temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
           weighter: WeighterSpec = "fixed") -> Recipe:
    """Averaged multi-teacher KD (Hinton's KD with the mean of the teachers' losses), as Rorozhl/CA-MKD runs its
    AVER baseline (``--ensemble_method AVERAGE_LOSS -r 1 -a 1``, kd_T 4):

        L = CE(S(x), y) + (1/K) sum_k T^2 KL(T_k(x)/T || S(x)/T),    T = 4, KL summed over classes, batch mean

    (RepDistiller's single-teacher KD weighs them 0.1 and 0.9: ``ce_weight``, ``kd_weight``). ``weighter``
    weighs the K teacher terms with any registered weighter instead of 1/K (``"ebkd"``, ``"aekd"``, ...)."""
    return avg_kd_teachers(student, [t1_teacher, t2_teacher, t3_teacher], num_classes=num_classes,
                           temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, weighter=weighter)


@register("ebkd", "EBKD, Kwon et al. 2020: per-sample teacher weights 1 - H(T_k)/sum_j H(T_j)", ROLES, **SCHEDULE)
def ebkd(student: ModelLike = "cifar_resnet18", t1_teacher: ModelLike | None = None,
         t2_teacher: ModelLike | None = None, t3_teacher: ModelLike | None = None, *, num_classes: int = 10,
         temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0) -> Recipe:
    """Entropy-based multi-teacher KD, as Rorozhl/CA-MKD implements it (``--ensemble_method EBKD -r 1 -a 1``;
    the ICASSP 2020 paper, on speech recognition, has no public code):

        L = CE(S(x), y) + (1/K) sum_k mean_b w_kb T^2 KL_b(T_k/T || S/T),  w_kb = 1 - H_kb / sum_j H_jb

    per sample, H_kb the entropy of softmax(T_k(x_b)) at T = 1, KD at T = 4. The code divides the weighted sum
    by K (``.sum() / (bsz * teacher_num)``; the weights sum to K - 1), which ``kd_weight / K`` reproduces."""
    return ebkd_teachers(student, [t1_teacher, t2_teacher, t3_teacher], num_classes=num_classes,
                         temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)


@register("ca_mkd", "CA-MKD, Zhang et al. 2022: per-sample weights (1 - softmax_k CE_k)/(K-1) on KD and features",
          ROLES, **SCHEDULE)
def ca_mkd(student: ModelLike = "cifar_resnet18", t1_teacher: ModelLike | None = None,
           t2_teacher: ModelLike | None = None, t3_teacher: ModelLike | None = None, *, num_classes: int = 10,
           temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0, feature_weight: float = 50.0,
           feature_from_epoch: int = 1, student_layer: str | None = None,
           teacher_layers: Sequence[str | None] | None = None) -> Recipe:
    """Confidence-aware multi-teacher KD (Rorozhl/CA-MKD, ``--distill inter --ensemble_method CAMKD -r 1 -a 1
    -b 50``, kd_T 4):

        L = CE + (1/K) sum_k mean_b w_kb T^2 KL_b(T_k/T || S/T) + (50/K) sum_k mean_b v_kb MSE_b(proj_k(f_S), f_Tk)
        w_kb = (1 - softmax_k CE(T_k(x_b), y_b)) / (K - 1)
        v_kb = (1 - softmax_k CE(head_k(proj_k(f_S))_b, y_b)) / (K - 1)

    f the last feature map of each network (its ``feat[-2]``; ``student_layer`` / ``teacher_layers`` pick
    others), proj_k its ``Embed`` (1x1 conv + BN + ReLU after resizing to the teacher's map), head_k the
    teacher's global pooling + classifier. Where the code departs from the paper's formulas it is followed: the
    weighted sums are divided by K (``.sum() / (bsz * teacher_num)``), and the feature term is left out in the
    first epoch (``if epoch == 1``; ``feature_from_epoch``), and the gradient flows through v as well (into the
    projectors and the student, through the teachers' frozen heads). One detail is not reproduced: the code
    resizes the student map in place, so a teacher reads the map resized for the previous one (only different
    when the teachers' maps differ in size; its runs use three ResNet32x4)."""
    return ca_mkd_teachers(student, [t1_teacher, t2_teacher, t3_teacher], num_classes=num_classes,
                           temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                           feature_weight=feature_weight, feature_from_epoch=feature_from_epoch,
                           student_layer=student_layer, teacher_layers=teacher_layers)


@register("aekd", "AE-KD, Du et al. 2020: teacher weights = capped min-norm point of their KD gradients", ROLES,
          **SCHEDULE)
def aekd(student: ModelLike = "cifar_resnet18", t1_teacher: ModelLike | None = None,
         t2_teacher: ModelLike | None = None, t3_teacher: ModelLike | None = None, *, num_classes: int = 10,
         temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 0.9, tolerance: float = 0.6,
         normalize: bool = False) -> Recipe:
    """Adaptive ensemble KD in gradient space (AnTuo1998/AE-KD, ``-r 1 -a 0.9 -C 0.6``, kd_T 4, svm_norm off):

        L = CE(S(x), y) + 0.9 sum_k w_k T^2 KL(T_k/T || S/T),   w = argmin ||sum_k w_k g_k||, sum w = 1, 0 <= w <= C

    g_k the batch mean of d KL_k / d z_S, C = 0.6 (:class:`GradientMinNorm`; batch-level weights). The code
    solves the capped min-norm problem as a one-class SVM with sklearn; here it is solved exactly in torch.
    (Rorozhl/CA-MKD runs the same weights with ``-a 1``.)"""
    return aekd_teachers(student, [t1_teacher, t2_teacher, t3_teacher], num_classes=num_classes,
                         temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, tolerance=tolerance,
                         normalize=normalize)


__all__ = ["ConfidenceHint", "ConfidenceWeights", "EntropyWeights", "GradientMinNorm", "Group", "Groups", "aekd",
           "aekd_teachers", "avg_kd", "avg_kd_teachers", "ca_mkd", "ca_mkd_teachers", "capped_min_norm", "ebkd",
           "ebkd_teachers", "final_feature"]
