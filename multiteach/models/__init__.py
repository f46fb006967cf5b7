"""CIFAR-sized architectures, registered in timm's registry.

Importing ``multiteach`` registers them, so ``timm.create_model("cifar_resnet18", num_classes=10)`` works
like any timm model name; any other timm model serves as student or teacher too.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from torch import nn

from .airbench import AIRBENCH94_RECIPE, Airbench94, AirbenchNet
from .mobilenetv2 import MobileNetV2
from .resnet import CifarResNet, resnet18, resnet56
from .wide_resnet import WideResNet

__all__ = ["AIRBENCH94_RECIPE", "Airbench94", "AirbenchNet", "CifarResNet", "MobileNetV2", "WideResNet",
           "natural_recipe"]

# timm passes these to every entrypoint; CIFAR models have no pretrained weights to fetch.
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(fn: Any, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained:
        raise ValueError(
            "CIFAR models have no hosted weights: pass pretrained=False and load a checkpoint instead "
            "(multiteach.Teacher(name, checkpoint=PATH))"
        )
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    return fn(**kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 for 32x32 inputs (11.2M parameters): the MTARD/RSLAD/ARD student."""
    return _build(resnet18, pretrained, kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-8 (78k parameters): a toy model for smoke runs and tests."""
    return _build(lambda **kw: CifarResNet((1, 1, 1), (16, 32, 64), head_name="fc", shortcut_name="downsample",
                                           **kw), pretrained, kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-20 (0.27M parameters)."""
    return _build(lambda **kw: CifarResNet((3, 3, 3), (16, 32, 64), head_name="fc", shortcut_name="downsample",
                                           **kw), pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-56 (0.86M parameters): MTARD's natural teacher."""
    return _build(resnet56, pretrained, kwargs)


@register_model
def cifar_wrn34_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WideResNet-34-10 (46.2M parameters): the TRADES adversarial teacher."""
    return _build(lambda **kw: WideResNet(34, 10, **kw), pretrained, kwargs)


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WideResNet-28-10 (36.5M parameters)."""
    return _build(lambda **kw: WideResNet(28, 10, **kw), pretrained, kwargs)


@register_model
def cifar_wrn16_4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WideResNet-16-4 (2.7M parameters): a cheap teacher for quick runs."""
    return _build(lambda **kw: WideResNet(16, 4, **kw), pretrained, kwargs)


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 for 32x32 inputs (2.3M parameters): a student in the ARD/RSLAD papers."""
    return _build(MobileNetV2, pretrained, kwargs)


@register_model
def cifar_airbench(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """airbench94's layout (2.0M parameters, a fifth of ResNet-18's multiply-adds): a fast natural teacher."""
    return _build(AirbenchNet, pretrained, kwargs)


@register_model
def cifar_airbench94(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """airbench94's network with its own start (a whitening stem fitted to the training images, identity-initialized
    convolutions, frozen BatchNorm scales): a natural teacher of ~94% in about ten epochs with its recipe
    (:func:`natural_recipe`)."""
    return _build(Airbench94, pretrained, kwargs)


_NATURAL_RECIPES = {"cifar_airbench94": AIRBENCH94_RECIPE}


def natural_recipe(name: str, max_batch: int | None = None, world: int = 1) -> dict[str, dict[str, Any]] | None:
    """The natural-training settings a network comes with (``{"train": TrainConfig fields, "options": the natural
    preset's}``), or None: a network tuned with its own recipe trains best with it. Its batch is global: under
    ``world`` processes each takes its share (TrainConfig's batch is per process). ``max_batch`` (per process):
    a smaller batch where the recipe's would leave a small training split few steps, the LR scaled with the
    global batch (linearly)."""
    recipe = _NATURAL_RECIPES.get(name)
    if recipe is None:
        return None
    train = dict(recipe["train"])
    batch = max(train["batch_size"] // max(world, 1), 1)
    if max_batch is not None and max_batch >= 1:
        batch = min(batch, max_batch)
    train["lr"] *= batch * max(world, 1) / train["batch_size"]
    train["batch_size"] = batch
    return {"train": train, "options": dict(recipe["options"])}
