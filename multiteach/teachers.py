"""Teachers: frozen by default (always in eval mode, no gradients, BN statistics that never move, no graph
kept), or trained online in the same step with their own loss and optimizer (a peer, as in PeerAiD)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
from torch import Tensor, nn

from . import models as _models  # noqa: F401  (registers the CIFAR models in timm's registry)
from .checkpoint import load_weights
from .preprocess import Preprocess, Preprocessed


def check_model_name(name: str) -> None:
    """Refuse a name timm's registry does not hold, with the nearest names and the CIFAR ones."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}: use a timm model name; CIFAR models are "
            f"{', '.join(timm.list_models('cifar_*'))}"
        )
    if "." in name and name not in timm.list_pretrained(name):  # 'resnet18.a1_in1k': a tag timm holds
        tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")
        raise ValueError(f"unknown pretrained tag in {name!r}: {', '.join(tags) or 'the model has none'}")


def create_model(name: str, num_classes: int | None = 10, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear message for an unknown name (``num_classes`` None: the model's own,
    e.g. its pretrained weights' classes)."""
    check_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not kwargs.get("pretrained"):
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError) as e:  # no network, no cached file, a hub error: what to do instead
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FileNotFoundError(
            f"pretrained weights of {name!r} could not be read ({type(e).__name__}: {detail}): on a machine "
            f"without internet, download them elsewhere (they land in the Hugging Face cache) and copy that cache "
            f"here, or give the file: weights = 'path/to/model.safetensors' (or .pth)") from None


def load_model(name: str, checkpoint: str | os.PathLike, num_classes: int = 10) -> nn.Module:
    """A timm model with the weights of ``checkpoint`` (weights only; a mismatch is explained)."""
    net = create_model(name, num_classes=num_classes)
    load_weights(net, checkpoint)
    return net


class Teacher(nn.Module):
    """A network whose outputs are distillation targets; frozen unless ``trainable``.

    Built from a timm model name (``Teacher("cifar_wrn34_10", checkpoint="adv.pt")``,
    ``Teacher("resnet50.a1_in1k", pretrained=True)``), torchvision (:meth:`from_torchvision`), RobustBench
    (:meth:`from_robustbench`) or any ``nn.Module``. Frozen: ``train()`` is a no-op and parameters never
    require grad, so a forward on a plain input keeps no graph; an input that requires grad (an attack crafted
    through the teacher) still gets its gradient.

    Inputs are [0, 1] images. A network that expects normalised inputs or a fixed size is held behind a
    :class:`~multiteach.preprocess.Preprocess` (``teacher.model`` is then a
    :class:`~multiteach.preprocess.Preprocessed`, whose layers keep their names, e.g. ``"layer3"``): pretrained
    weights bring their own mean/std/input size; ``mean``/``std``/``input_size`` set them for any network.
    Images of another size are refused with a one-line error unless ``resize``.

    Trainable (an online peer): ``loss(teacher_out, student_out, y) -> per-sample`` is the teacher's own
    objective on the input its branch gives it (``student_out`` detached), minimised in the same step by its
    own optimizer, ``optimizer = {"name": "sgd", "lr": 0.1, ...}`` (any ``torch.optim`` class by name; it
    follows the student's LR schedule). The student distils from its detached output.

    ``num_classes``: the head's classes (default: the pretrained weights' classes, else 10). ``**timm_kwargs``
    go to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay=dict(file="weights.pth")``: local weights).
    """

    def __init__(
        self,
        model: nn.Module | str,
        checkpoint: str | os.PathLike | None = None,
        num_classes: int | None = None,
        name: str | None = None,
        *,
        trainable: bool = False,
        loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        pretrained: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        preprocessing = {"mean": mean, "std": std, "input_size": input_size, "resize": resize}
        if isinstance(model, str):
            from .pretrained import new_head, timm_model

            name = name or model
            model = timm_model(model, pretrained, num_classes, **preprocessing, fetch=checkpoint is None,
                               **timm_kwargs)
            if pretrained and not trainable and checkpoint is None and new_head(model):
                inner = getattr(model, "net", model)
                raise ValueError(
                    f"teacher {name!r}: its pretrained weights have {inner.pretrained_cfg['num_classes']} classes, "
                    f"not {inner.num_classes}: a frozen teacher would get an untrained head; use data with its "
                    "classes, a checkpoint with this head, or trainable=True")
        elif pretrained or timm_kwargs:
            raise TypeError("pretrained= and timm keyword arguments apply to a timm model name, not to a module: "
                            f"got {', '.join(['pretrained'] * pretrained + list(timm_kwargs))}")
        elif mean is not None or std is not None or input_size is not None or resize:
            if isinstance(model, Preprocessed):
                raise ValueError("this network already has its preprocessing: pass mean/std/input_size/resize to "
                                 "the function that built it")
            model = Preprocessed(model, Preprocess(**preprocessing))
        if not isinstance(model, nn.Module):
            raise TypeError(f"Teacher needs an nn.Module or a timm model name, got {type(model).__name__}")
        if trainable and loss is None:
            raise ValueError("a trainable teacher needs its own loss: Teacher(..., trainable=True, loss=fn) with "
                             "fn(teacher_logits, student_logits, y) -> per-sample loss")
        if checkpoint is not None:
            load_into(model, checkpoint)
        self.model = model
        self.name = name or type(getattr(model, "net", model)).__name__
        if isinstance(model, Preprocessed):
            model.preprocess.name = f"teacher {self.name!r}"
        self.trainable = trainable
        self.loss = loss
        self.optimizer = dict(optimizer or {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
        self.model.requires_grad_(trainable)
        super().train(False)

    @classmethod
    def from_torchvision(cls, model: str, weights: str | None = "DEFAULT", num_classes: int | None = None, *,
                         input_size: int | Sequence[int] | None = None, resize: bool = False,
                         **teacher_kwargs: Any) -> Teacher:
        """torchvision's ``model`` with ``weights`` by name (``"IMAGENET1K_V2"``, ``"DEFAULT"``; None: untrained),
        normalised as its weights' transforms say. The file is downloaded from download.pytorch.org into
        ``$TORCH_HOME/hub/checkpoints`` unless already there."""
        from .pretrained import torchvision_model

        net = torchvision_model(model, weights, num_classes, input_size=input_size, resize=resize)
        return cls(net, name=teacher_kwargs.pop("name", None) or model, **teacher_kwargs)

    @classmethod
    def from_robustbench(cls, model: str, dataset: str = "cifar10", threat_model: str = "Linf",
                         model_dir: str | os.PathLike = "models", *, input_size: int | Sequence[int] | None = None,
                         resize: bool = False, **teacher_kwargs: Any) -> Teacher:
        """RobustBench's ``model`` (e.g. ``"Carmon2019Unlabeled"``) for ``dataset`` and ``threat_model``, read from
        ``model_dir/<dataset>/<threat_model>/<model>.pt`` (downloaded from its model zoo first if absent).
        Needs the optional robustbench package (``multiteach.pretrained.ROBUSTBENCH_INSTALL``)."""
        from .pretrained import robustbench_model

        net = robustbench_model(model, dataset, threat_model, model_dir, input_size=input_size, resize=resize)
        return cls(net, name=teacher_kwargs.pop("name", None) or model, **teacher_kwargs)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    @property
    def preprocess(self) -> Preprocess | None:
        """The normalisation / size check in front of the network, if any."""
        return self.model.preprocess if isinstance(self.model, Preprocessed) else None

    def train(self, mode: bool = True) -> Teacher:
        """Frozen teachers stay in eval mode whatever their container asks; trainable ones follow it."""
        return super().train(mode and self.trainable)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {'trainable' if self.trainable else 'frozen'}"


def load_into(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """:func:`~multiteach.checkpoint.load_weights` into ``model``; for a preprocessed network, into the bare
    network unless the checkpoint was saved from the wrapper (keys ``net.*``)."""
    if isinstance(model, Preprocessed):
        from .checkpoint import load_checkpoint, state_dict_of

        keys = state_dict_of(load_checkpoint(checkpoint))
        if not all(k.startswith(("net.", "preprocess.")) for k in keys):
            load_weights(model.net, checkpoint)
            return model
    return load_weights(model, checkpoint)


def as_teacher(module: nn.Module) -> Teacher:
    """``module`` as a :class:`Teacher`: a Teacher as it is, any other module wrapped frozen."""
    return module if isinstance(module, Teacher) else Teacher(module)


__all__ = ["Teacher", "as_teacher", "create_model", "load_into", "load_model"]
