"""multiteach: multi-teacher (adversarial) knowledge distillation for PyTorch.

A recipe is a student, N branches (input transform, teacher, per-sample loss) and a weighter; MTARD
(Zhao et al., ECCV 2022) is ``presets.mtard``: an adversarial teacher on PGD inputs and a natural teacher
on clean inputs, balanced by the Adaptive Normalization Loss (``ANL``).

Names are imported on first use (PEP 562), so ``multiteach --help`` does not pay for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EntropyBalance": "balance",
    "CheckpointError": "checkpoint", "atomic_save": "checkpoint", "load_checkpoint": "checkpoint",
    "load_weights": "checkpoint",
    "DataConfig": "config", "EvalConfig": "config", "ExperimentConfig": "config", "ModelConfig": "config",
    "TrainConfig": "config",
    "TensorLoader": "data", "load_cifar": "data", "split_validation": "data", "Files": "data",
    "StreamingLoader": "loaders", "make_loader": "loaders",
    "Dataset": "datasets",
    "AutoAttack": "evaluation", "Square": "evaluation", "Transfer": "evaluation", "evaluate": "evaluation",
    "standard_attacks": "evaluation",
    "CrossEntropy": "losses", "FeatureHint": "losses", "KLDistill": "losses", "kl_divergence": "losses",
    "STUDENT": "recipe", "Branch": "recipe", "Recipe": "recipe", "StepOutput": "recipe",
    "ATTACKS": "registry", "DATASETS": "registry", "PRESETS": "registry", "WEIGHTERS": "registry",
    "Registry": "registry",
    "Teacher": "teachers", "create_model": "teachers",
    "Preprocess": "preprocess", "with_preprocessing": "preprocess",
    "Trainer": "engine", "TrainResult": "engine",
    "FGSM": "transforms", "NFGSM": "transforms", "PGD": "transforms", "CallableTransform": "transforms",
    "Clean": "transforms",
    "InputTransform": "transforms", "TorchattacksTransform": "transforms", "as_transform": "transforms",
    "ANL": "weighting", "DWA": "weighting", "Fixed": "weighting", "RandomLossWeighting": "weighting",
    "StepContext": "weighting", "UncertaintyWeighting": "weighting", "Weighter": "weighting",
}
_SUBMODULES = {"balance", "budget", "build", "checkpoint", "cli", "config", "data", "datasets", "distributed",
               "engine", "evaluation", "fast", "features", "loaders", "losses", "methods", "models", "pipeline",
               "plots", "preprocess", "presets", "pretrained", "recipe", "registry", "runtime", "teachers",
               "trainer", "transforms", "weighting"}

__all__ = sorted([*_EXPORTS, "models", "presets"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'multiteach' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
