"""Pretrained networks from timm, torchvision and RobustBench, each taking [0, 1] images.

Each loader returns the network behind the preprocessing its weights expect (see :mod:`multiteach.preprocess`):
timm's ``pretrained_cfg`` mean/std/input size, torchvision weights' transforms; RobustBench models normalise
inside themselves and only hold the data's size (32 px for CIFAR, 224 for ImageNet). What is downloaded at run
time, and where it is kept:

- timm (``pretrained=True``): the weights from the Hugging Face Hub (or the model's own URL) into the Hugging
  Face / torch hub cache; ``pretrained_cfg_overlay=dict(file=PATH)`` reads a local file instead.
- torchvision (``weights="IMAGENET1K_V2"``): download.pytorch.org into ``$TORCH_HOME/hub/checkpoints`` (see
  :func:`torchvision_cache_file`); a file already there is used as it is.
- RobustBench: the model zoo's links (mostly Google Drive) into ``model_dir/<dataset>/<threat_model>/<name>.pt``;
  a file already there is used as it is.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .preprocess import with_preprocessing

# RobustBench 1.1.1 on PyPI pins timm==1.0.9 and gdown==5.1.0; it is installed without its pins, these beside it
ROBUSTBENCH_INSTALL = "pip install 'multiteach[robustbench]' && pip install --no-deps robustbench"
_ROBUSTBENCH_SIZES = {"cifar10": (32, 10), "cifar100": (32, 100), "imagenet": (224, 1000)}


def _interpolation(mode: Any) -> str:
    mode = str(getattr(mode, "value", mode) or "bilinear").lower()
    return mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"


def _set_num_classes(net: nn.Module, n: int) -> nn.Module:
    """Give ``net`` a ``num_classes`` (torchvision and RobustBench models have none) so the recipe can check
    the class counts of students and teachers."""
    if not isinstance(getattr(net, "num_classes", None), int):
        net.num_classes = n
    return net


def _close(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ----------------------------------------------------------------------------------------------------- timm
def timm_model(name: str, pretrained: bool = False, num_classes: int | None = None, *,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               input_size: int | Sequence[int] | None = None, resize: bool = False, fetch: bool = True,
               **kwargs: Any) -> nn.Module:
    """A timm model; with ``pretrained``, its published weights (or ``pretrained_cfg_overlay=dict(file=PATH)``)
    behind its ``pretrained_cfg`` normalisation and input size. ``num_classes`` None: the weights' classes (10
    without weights); another count gives a new head. ``mean``/``std``/``input_size`` override the config's.
    ``fetch=False``: the pretrained preprocessing without reading the weights (a checkpoint replaces them)."""
    from .teachers import create_model

    if not pretrained:
        net = create_model(name, num_classes=10 if num_classes is None else num_classes, **kwargs)
        return with_preprocessing(net, mean, std, input_size, resize, name=f"model {name!r}")
    net = create_model(name, num_classes=num_classes, pretrained=fetch, **kwargs)
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    return with_preprocessing(net, mean if mean is not None else cfg.get("mean"),
                              std if std is not None else cfg.get("std"),
                              input_size if input_size is not None else cfg.get("input_size"), resize,
                              _interpolation(cfg.get("interpolation")), name=f"model {name!r}")


def new_head(net: nn.Module) -> bool:
    """Whether a pretrained timm model got a head of another class count than its weights (freshly initialised)."""
    inner = getattr(net, "net", net)
    cfg = getattr(inner, "pretrained_cfg", None) or {}
    n = cfg.get("num_classes")
    return isinstance(n, int) and n > 0 and getattr(inner, "num_classes", n) != n


# ----------------------------------------------------------------------------------------------- torchvision
def _torchvision_weights(name: str, weights: str | bool | None) -> Any:
    """The weights enum member ``weights`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ``"ResNet50_Weights.IMAGENET1K_V2"``,
    True for DEFAULT) of torchvision's classification model ``name``, or None."""
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        raise ValueError(f"unknown torchvision classification model {name!r}{_close(name, names)}: see "
                         "torchvision.models.list_models(module=torchvision.models)")
    if weights is None or weights is False:
        return None
    enum = tvm.get_model_weights(name)
    key = "DEFAULT" if weights is True else str(weights).rsplit(".", 1)[-1]
    if key not in enum.__members__:
        raise ValueError(f"torchvision {name} has no weights {weights!r}: choose one of "
                         f"{', '.join(enum.__members__)}")
    return enum[key]


def torchvision_cache_file(name: str, weights: str | bool = "DEFAULT") -> Path:
    """Where torchvision keeps (and first looks for) the weights file: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    import torch.hub

    w = _torchvision_weights(name, weights)
    if w is None:
        raise ValueError(f"torchvision {name}: name the weights (e.g. 'DEFAULT')")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def torchvision_model(name: str, weights: str | bool | None = "DEFAULT", num_classes: int | None = None, *,
                      input_size: int | Sequence[int] | None = None, resize: bool = False,
                      **kwargs: Any) -> nn.Module:
    """torchvision's classification model ``name`` with ``weights`` by name (None: untrained), behind the
    normalisation of the weights' transforms and held to their crop size (``resize`` to resize other sizes)."""
    import torchvision.models as tvm

    w = _torchvision_weights(name, weights)
    if w is None:
        n = 10 if num_classes is None else num_classes
        net = tvm.get_model(name, weights=None, num_classes=n, **kwargs)
        return with_preprocessing(_set_num_classes(net, n), input_size=input_size, resize=resize,
                                  name=f"model {name!r}")
    n = len(w.meta["categories"])
    if num_classes is not None and num_classes != n:
        raise ValueError(f"torchvision {name} weights {w.name} have {n} classes, not {num_classes}: use data with "
                         f"their {n} classes, weights=None to train a {num_classes}-class {name}, or the timm "
                         f"source, which puts a new {num_classes}-class head on its pretrained models")
    t = w.transforms()
    if not hasattr(t, "mean") or not hasattr(t, "crop_size"):
        raise ValueError(f"torchvision {name} weights {w.name} are not for image classification")
    net = tvm.get_model(name, weights=w, **kwargs)
    return with_preprocessing(_set_num_classes(net, n), t.mean, t.std,
                              input_size if input_size is not None else t.crop_size, resize,
                              _interpolation(getattr(t, "interpolation", None)), name=f"model {name!r}")


# ----------------------------------------------------------------------------------------------- RobustBench
@contextlib.contextmanager
def _robustbench_import() -> Iterator[None]:
    """robustbench 1.1.1 imports ``autoattack`` (which its dependency pyautoattack installs as ``pyautoattack``)
    and ``pkg_resources`` (gone from setuptools >= 81) when it is imported; lend both for the import only."""
    lent = []
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        import pyautoattack
        import pyautoattack.state

        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
        lent += ["autoattack", "autoattack.state"]
    if importlib.util.find_spec("pkg_resources") is None:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda package, path: os.path.join(  # type: ignore[attr-defined]
            os.path.dirname(sys.modules[package].__file__ or ""), path)
        sys.modules["pkg_resources"] = stub
        lent.append("pkg_resources")
    try:
        yield
    finally:
        for key in lent:
            sys.modules.pop(key, None)


def robustbench_installed() -> bool:
    """The robustbench distribution is installed (torchattacks ships an old copy of its ``robustbench``
    module that imports as one but is not it: its loader lacks today's download code)."""
    import importlib.metadata

    try:
        importlib.metadata.version("robustbench")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("robustbench") is not None


def _robustbench() -> tuple[Any, Any]:
    """(robustbench.utils.load_model, robustbench.model_zoo.model_dicts), or a one-line install error."""
    if not robustbench_installed():
        raise ImportError(f"RobustBench models need the robustbench package: {ROBUSTBENCH_INSTALL}")
    try:
        with _robustbench_import():
            from robustbench.model_zoo import model_dicts
            from robustbench.utils import load_model
    except ImportError as e:
        raise ImportError(f"robustbench cannot be imported ({e}): {ROBUSTBENCH_INSTALL}") from None
    return load_model, model_dicts


def robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                      model_dir: str | os.PathLike = "models", *, input_size: int | Sequence[int] | None = None,
                      resize: bool = False) -> nn.Module:
    """RobustBench's model ``name`` for ``dataset`` and ``threat_model`` with its weights: read from
    ``model_dir/<dataset>/<threat_model>/<name>.pt``, downloaded there first if absent. RobustBench models take
    [0, 1] inputs (they normalise inside); they are held to the dataset's image size (``resize`` to resize)."""
    if dataset not in _ROBUSTBENCH_SIZES:
        raise ValueError(f"unknown RobustBench dataset {dataset!r}: use one of {', '.join(_ROBUSTBENCH_SIZES)}")
    load_model, model_dicts = _robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    threats = {t.value: t for t in model_dicts[BenchmarkDataset(dataset)]}
    if threat_model not in threats:
        raise ValueError(f"RobustBench has no {dataset} models for threat model {threat_model!r}: use one of "
                         f"{', '.join(threats)}")
    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in zoo:
        raise ValueError(f"RobustBench has no {dataset} {threat_model} model {name!r}{_close(name, zoo)}: see "
                         "its leaderboard (robustbench.model_zoo.model_dicts)")
    net = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model).eval()
    size, n = _ROBUSTBENCH_SIZES[dataset]
    return with_preprocessing(_set_num_classes(net, n), input_size=size if input_size is None else input_size,
                              resize=resize, name=f"model {name!r}")


def robustbench_file(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                     model_dir: str | os.PathLike = "models") -> Path:
    """Where RobustBench keeps (and first looks for) the weights of ``name``."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


# ---------------------------------------------------------------------------------------------- from a config
def from_config(cfg: Any, num_classes: int, name: str = "student", teacher: bool = False) -> nn.Module:
    """The network a :class:`~multiteach.ModelConfig` names (source, pretrained weights, resize), with its
    checkpoint loaded; named ``name`` in size errors. ``teacher``: refuse a pretrained head replaced by an
    untrained one (the data's class count differs from the weights')."""
    from .teachers import load_into

    if cfg.source == "timm":
        overlay = {"pretrained_cfg_overlay": {"file": cfg.weights}} if cfg.weights else {}
        net = timm_model(cfg.model, cfg.pretrained or cfg.weights is not None, num_classes, resize=cfg.resize,
                         fetch=cfg.checkpoint is None, **overlay)
        if teacher and cfg.checkpoint is None and new_head(net):
            inner = getattr(net, "net", net)
            raise ValueError(f"{name} {cfg.model!r}: its pretrained weights have "
                             f"{inner.pretrained_cfg['num_classes']} classes but the data has {num_classes}: a "
                             "frozen teacher would get an untrained head; give it a checkpoint with this head")
    elif cfg.source == "torchvision":
        net = torchvision_model(cfg.model, cfg.weights or ("DEFAULT" if cfg.pretrained else None), num_classes,
                                resize=cfg.resize)
    else:
        where = Path(cfg.weights)
        model_dir = where.parent.parent if len(where.parts) > 2 else Path("models")
        net = robustbench_model(cfg.model, where.parts[-2], where.parts[-1], model_dir, resize=cfg.resize)
    if cfg.checkpoint is not None:
        load_into(net, cfg.checkpoint)
    if hasattr(net, "preprocess"):
        net.preprocess.name = name
    return net


__all__ = ["ROBUSTBENCH_INSTALL", "from_config", "new_head", "robustbench_file", "robustbench_model", "timm_model",
           "torchvision_cache_file", "torchvision_model"]
