"""Training without a teacher: natural (CE on clean images) and SAT / PGD-AT (CE on PGD examples)."""

from __future__ import annotations

from ..losses import CrossEntropy
from ..recipe import Branch, Recipe
from ..transforms import PGD, Clean
from ._common import ModelLike, as_student, register


@register("natural", "cross-entropy on clean images (natural teachers, the 'Natural' row)", epochs=200,
          milestones=(100, 150), select="clean")
def natural(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, label_smoothing: float = 0.0) -> Recipe:
    """Standard training: CE(S(x), y)."""
    return Recipe(as_student(student, num_classes), [Branch(Clean(), CrossEntropy(label_smoothing), name="ce")],
                  name="natural")


@register("sat", "PGD adversarial training, Madry et al. 2018 (SAT / PGD-AT)", epochs=200, milestones=(100, 150))
def sat(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10, start: str = "uniform", bn_mode: str = "train",
        norm: str = "Linf") -> Recipe:
    """CE(S(x_adv), y), x_adv = PGD-10 (step 2/255, uniform start). The attack runs the student with its
    BatchNorm in train mode, as the MadryLab code does (its model is built in training mode and attacked so);
    the MTARD and RSLAD repositories ship no SAT training script, so what their comparison used is not
    documented. ``bn_mode="eval"`` attacks the eval-mode student, as the distillation methods' attacks do
    (our fast reference plan uses it). ``norm="L2"`` (e.g. eps 0.5, alpha 0.1) trains an L2-robust model."""
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode, norm=norm)
    return Recipe(as_student(student, num_classes), [Branch(pgd, CrossEntropy(), name="adv_ce")], name="sat")
