"""Intermediate features for feature branches: forward hooks on named layers.

Hooks capture a layer's output during the forward that also gives the logits, so a feature branch costs no
extra pass (timm's ``forward_intermediates`` would run a second one); they work on any ``nn.Module``, timm
or not, and through a DDP wrapper. Layer names are ``model.named_modules()`` names, e.g. ``"layer3"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``; a one-line error listing the top-level names when absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"{type(model).__name__} has no layer {name!r}: its top-level layers are "
                         f"{', '.join(top)} (nested ones as 'layer3.0.conv1')") from None


@contextlib.contextmanager
def capture(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward of ``model`` stores the output of each named layer in the dict."""
    out: dict[str, Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        def hook(module: nn.Module, inputs: object, output: Tensor, name: str = name) -> None:
            out[name] = output
        handles.append(layer(model, name).register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def feature_shapes(model: nn.Module, names: Iterable[str], input_shape: tuple[int, ...] = (3, 32, 32)
                   ) -> dict[str, tuple[int, ...]]:
    """The per-sample shape of each named layer's output for an input of ``input_shape`` (one probe forward,
    in eval mode, the model's mode restored): what a projector between two layers is built from."""
    from .transforms import module_mode

    p = next(model.parameters(), None)
    x = torch.zeros(2, *input_shape, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    with module_mode(model, "eval"), capture(model, names) as feats:
        model(x)
    return {n: tuple(f.shape[1:]) for n, f in feats.items()}


__all__ = ["capture", "feature_shapes", "layer"]
