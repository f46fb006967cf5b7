"""multiteach: multi-teacher (adversarial) knowledge distillation for PyTorch.

A recipe is a student, N branches (input transform, frozen teacher, loss) and a weighter; MTARD
(Zhao et al., ECCV 2022) is ``presets.mtard``: an adversarial teacher on PGD inputs and a natural teacher
on clean inputs, balanced by the Adaptive Normalization Loss (``ANL``).
"""

from . import models, presets
from .balance import EntropyBalance
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_weights
from .config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainConfig
from .data import TensorLoader, load_cifar, split_validation
from .evaluate import AutoAttack, Square, Transfer, evaluate, standard_attacks
from .losses import CrossEntropy, KLDistill, kl_divergence
from .recipe import STUDENT, Branch, Recipe, StepOutput
from .teachers import Teacher, create_model
from .trainer import Trainer, TrainResult
from .transforms import FGSM, PGD, Clean, InputTransform
from .weighting import ANL, DWA, Fixed, RandomLossWeighting, UncertaintyWeighting, Weighter

__version__ = "0.1.0"

__all__ = [
    "ANL", "DWA", "FGSM", "PGD", "STUDENT", "AutoAttack", "Branch", "CheckpointError", "Clean", "CrossEntropy",
    "DataConfig", "EntropyBalance", "EvalConfig", "ExperimentConfig", "Fixed", "InputTransform", "KLDistill",
    "ModelConfig", "RandomLossWeighting", "Recipe", "Square", "StepOutput", "Teacher", "TensorLoader",
    "TrainConfig", "TrainResult", "Trainer", "Transfer", "UncertaintyWeighting", "Weighter", "atomic_save",
    "create_model", "evaluate", "kl_divergence", "load_checkpoint", "load_cifar", "load_weights", "models",
    "presets", "split_validation", "standard_attacks",
]
