"""Training without a teacher: natural (CE on clean images) and SAT / PGD-AT (CE on PGD examples)."""

from __future__ import annotations

from ..losses import CrossEntropy
from ..recipe import Branch, Recipe
from ..transforms import NFGSM, PGD, Clean
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
        norm: str = "Linf", label_smoothing: float = 0.0) -> Recipe:
    """CE(S(x_adv), y), x_adv = PGD-10 (step 2/255, uniform start). The attack runs the student with its
    BatchNorm in train mode, as the MadryLab code does (its model is built in training mode and attacked so);
    the MTARD and RSLAD repositories ship no SAT training script, so what their comparison used is not
    documented. ``bn_mode="eval"`` attacks the eval-mode student, as the distillation methods' attacks do
    (our fast reference plan uses it). ``norm="L2"`` (e.g. eps 0.5, alpha 0.1) trains an L2-robust model.
    ``label_smoothing`` on the CE: a teacher-strength lever (softer, better-calibrated teachers)."""
    pgd = PGD(eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode, norm=norm)
    return Recipe(as_student(student, num_classes), [Branch(pgd, CrossEntropy(label_smoothing), name="adv_ce")],
                  name="sat")


@register("nfgsm", "N-FGSM, de Jorge et al. 2022: CE on one step of eps from x + U(-2eps, 2eps), not projected",
          epochs=30, schedule="cyclic", milestones=(), cycle_momentum=0.8, lr=0.2, weight_decay=5e-4)
def nfgsm(student: ModelLike = "cifar_resnet18", *, num_classes: int = 10, eps: float = 8 / 255, k: float = 2.0,
          alpha: float | None = None, clip: float | None = None, bn_mode: str = "train",
          label_smoothing: float = 0.0) -> Recipe:
    """Single-step adversarial training (pdejorge/N-FGSM ``train.py`` defaults): CE(S(x'), y), x' one signed
    step of eps from x + U(-2 eps, 2 eps), inside [0, 1], no projection to the eps-ball, the student attacked in
    train mode; 30 epochs, SGD 0.2 with the code's cyclic LR (torch's CyclicLR: linear up to the peak at half,
    down to 0, momentum 0.9 falling to 0.8 at the peak), weight decay 5e-4. A cheap adversarial teacher: one
    gradient pass per batch where PGD-10 takes ten.
    ``label_smoothing`` on the CE, as :func:`sat`."""
    return Recipe(as_student(student, num_classes),
                  [Branch(NFGSM(eps, k, alpha, clip, bn_mode), CrossEntropy(label_smoothing), name="adv_ce")],
                  name="nfgsm")
