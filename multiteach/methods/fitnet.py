"""FitNet (Romero et al., ICLR 2015): the student's middle feature, through a regressor, mimics the teacher's
(the hint), beside CE and Hinton KD on the logits, in one stage as RepDistiller and Rorozhl/CA-MKD train it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..features import feature_shapes
from ..losses import CrossEntropy, FeatureHint, KLDistill
from ..recipe import Branch, Recipe
from ..transforms import Clean
from ..weighting import Fixed
from ._common import ModelLike, as_student, as_teacher, register

HINT_LAYERS = ("layer2", "block2")  # feat[2] of RepDistiller's ResNets / WRNs: the output of the middle stage


class HintRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` (the regressor of its FitNet): a convolution from the student's (C, H, W) to
    the teacher's, chosen by the spatial sizes (3x3 stride 2 when the student's map is twice as large, a 4x4
    transposed convolution when half, a (1+H_s-H_t)-wide kernel when larger or equal, else bilinear upsampling
    and a 3x3 convolution), then BN and ReLU."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        (sc, sh, sw), (tc, th, tw) = student_shape, teacher_shape
        self.size: tuple[int, int] | None = None
        if sh == 2 * th:
            self.conv: nn.Module = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
        elif 2 * sh == th:
            self.conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
        elif sh >= th:
            self.conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
        else:
            self.size, self.conv = (th, tw), nn.Conv2d(sc, tc, 3, padding=1)
        self.bn = nn.BatchNorm2d(tc)

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear")
        return F.relu(self.bn(self.conv(x)))


def hint_layer(model: nn.Module, given: str | None, option: str) -> str:
    """``given``, or the model's middle stage by name (``layer2``, ``block2``); a one-line error otherwise."""
    if given is not None:
        return given
    names = [n for n, _ in model.named_children()]
    for name in HINT_LAYERS:
        if name in names:
            return name
    raise ValueError(f"fitnet: {type(model).__name__} has no {' or '.join(HINT_LAYERS)} layer: pass {option}=... "
                     f"(its top-level layers: {', '.join(names)})")


@register("fitnet", "FitNet, Romero et al. 2015: CE + KD (T = 4) + 100 x hint MSE through a regressor", ("nat",),
          epochs=240, milestones=(150, 180, 210))
def fitnet(student: ModelLike = "cifar_resnet18", nat_teacher: ModelLike | None = None, *, num_classes: int = 10,
           student_layer: str | None = None, teacher_layer: str | None = None, temperature: float = 4.0,
           ce_weight: float = 1.0, kd_weight: float = 1.0, hint_weight: float = 100.0) -> Recipe:
    """FitNet as RepDistiller (HobbitLong/RepDistiller, ``--distill hint -b 100``, ``hint_layer 2``) and
    Rorozhl/CA-MKD's FitNet-MKD (``-r 1 -a 1 -b 100``, kd_T 4) train it, with one teacher:

        L = CE(S(x), y) + T^2 KL(T(x)/T || S(x)/T) + 100 mean((r(f_S) - f_T)^2),    T = 4

    f the output of the middle stage (``layer2``, or ``block2`` of a WRN; ``student_layer`` / ``teacher_layer``
    name others, required for models without such names), r a :class:`HintRegressor` trained with the student,
    the MSE averaged over the feature's elements. Romero et al. train in two stages (the hint alone first, then
    KD with an annealed weight); this is the single-stage joint objective of those repositories, with the KD
    term of FitNet's second stage (RepDistiller's own FitNet row sets ``kd_weight=0``)."""
    teacher = as_teacher(nat_teacher, num_classes, "nat")
    net = as_student(student, num_classes)
    s_layer = hint_layer(net, student_layer, "student_layer")
    t_layer = hint_layer(teacher.model, teacher_layer, "teacher_layer")
    s_shape = feature_shapes(net, [s_layer])[s_layer]
    t_shape = feature_shapes(teacher.model, [t_layer])[t_layer]
    if len(s_shape) != 3 or len(t_shape) != 3:
        raise ValueError(f"fitnet hints between feature maps: {s_layer!r} gives {s_shape}, {t_layer!r} {t_shape}")
    regressor = HintRegressor(s_shape, t_shape).to(next(net.parameters()))
    branches = [
        Branch(Clean(), CrossEntropy(), name="ce"),
        Branch(Clean(), KLDistill(temperature, "batchmean", temperature_squared=True), teacher=teacher, name="kd"),
        Branch(Clean(), FeatureHint(s_shape[0], t_shape[0], projector=regressor), teacher=teacher,
               student_layer=s_layer, teacher_layer=t_layer, name="hint"),
    ]
    return Recipe(net, branches, Fixed([ce_weight, kd_weight, hint_weight]), name="fitnet")


__all__ = ["HintRegressor", "fitnet", "hint_layer"]
