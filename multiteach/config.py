"""Validated configuration (pydantic): the same models back the Python API, TOML/JSON files and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(_Strict):
    """The optimisation loop: SGD, LR schedule, precision, checkpoints, logging, the evaluation hook."""

    epochs: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1, description="per process; the global batch is this times the world size")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(2e-4, ge=0)
    nesterov: bool = False
    optimizer: str = Field("sgd", description="a torch.optim optimizer by name (sgd, adamw, ...); momentum and "
                                              "nesterov apply to sgd, optimizer_options to any")
    optimizer_options: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments of the "
                                                                                "optimizer, e.g. betas")
    schedule: Literal["piecewise", "cosine", "constant", "onecycle", "cyclic"] = Field(
        "piecewise", description="piecewise (x gamma at milestones), cosine, constant, onecycle, or cyclic (linear up "
                                 "to the base LR at half the epochs, then down to 0: N-FGSM's)")
    milestones: list[int] = Field(default_factory=lambda: [215, 260, 285])
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    hold_fraction: float = Field(0.0, ge=0, lt=1, description="cosine only: the share of the epochs after the "
                                                               "warm-up held at the base LR before the decay (CIARD: "
                                                               "0.5); a share, so it follows a budget's epochs")
    cycle_momentum: float | None = Field(None, ge=0, lt=1, description="cyclic only: SGD momentum at the LR's peak, "
                                                                      "back to `momentum` as the LR returns to 0, as "
                                                                      "torch's CyclicLR (N-FGSM: 0.8)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool | None = Field(None, description="default: on for CUDA")
    compile: bool = False
    sync_bn: bool = Field(False, description="distributed: SyncBatchNorm in the student (batch statistics "
                                             "over the global batch)")
    fast: bool = Field(True, description="CUDA only: BN-folded bf16 teachers, CUDA-graph attacks and teachers")
    device: str = "auto"
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, numpy and the data order")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (quick runs)")
    time_budget_s: float | None = Field(
        None, gt=0, description="wall-clock seconds for this run: the epochs (at most `epochs`) are chosen from "
                                "the throughput measured in its first steps, and cut if it runs behind")
    stage_budget_s: float | None = Field(
        None, ge=0, description="a budgeted pipeline stage's nominal seconds (its share of the command's budget): "
                                "digested, so that a stage trained under one budget is not reused under another "
                                "(time_budget_s, the share of the time still left when the stage starts, is not)")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the student's weights (decay warmed "
                                      "up as 1 - (1 + step)^-3/4, capped here); validation selects raw or EMA")
    eval_every: int = Field(1, ge=0, description="epochs between validation evaluations, and the last epoch (0: never)")
    eval_pgd_steps: int = Field(20, ge=1)
    select: Literal["w_robust", "robust", "clean"] = "w_robust"
    checkpoint_every: int = Field(1, ge=1, description="epochs between writes of last.pt (the last epoch and an "
                                                       "interruption always write one)")
    log_every: int = Field(50, ge=1)
    progress: bool = True
    tensorboard: bool = False

    @model_validator(mode="after")
    def _schedule_shape(self) -> TrainConfig:
        if self.hold_fraction and self.schedule != "cosine":
            raise ValueError(f"hold_fraction holds a cosine schedule at its base LR: set schedule = 'cosine' (it is "
                             f"{self.schedule!r}) or hold_fraction = 0")
        if self.cycle_momentum is not None and (self.schedule != "cyclic" or self.optimizer.lower() != "sgd"):
            raise ValueError(f"cycle_momentum cycles SGD's momentum with a cyclic schedule: it needs schedule = "
                             f"'cyclic' and optimizer = 'sgd' (they are {self.schedule!r}, {self.optimizer!r}); "
                             f"or leave cycle_momentum unset")
        if self.warmup_epochs and self.schedule in ("cyclic", "onecycle"):
            raise ValueError(f"the {self.schedule} schedule rises from a low LR itself: a warm-up before it would end "
                             f"at the base LR and drop; set warmup_epochs = 0")
        return self

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing epoch numbers >= 1")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device {v!r}: use 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
        return v

    def lr_factor(self, epoch_progress: float) -> float:
        """LR / base LR at a (fractional) epoch (see :func:`multiteach.engine.optim.lr_factor`)."""
        from .engine.optim import lr_factor

        return lr_factor(self, epoch_progress)


class DataConfig(_Strict):
    dataset: str = Field("cifar10", description="a registered dataset (multiteach.registry.DATASETS): cifar10, "
                                                "cifar100, svhn, imagefolder, npz, or one you register")
    data_dir: str | None = Field(None, description="folder with train.npz/test.npz (x uint8 NHWC, y), or for "
                                                   "imagefolder with train/<class>/* and val/<class>/*")
    root: str = Field("data", description="torchvision download folder when data_dir is not set")
    download: bool = False
    val_size: int = Field(1000, ge=0, description="training images held out for model selection")
    train_size: int | None = Field(None, ge=1, description="use only this many training images (quick runs)")
    test_size: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the validation split and the train_size subset")
    image_size: int | None = Field(
        None, ge=8, description="training and evaluation resolution (square, pixels): arrays of another size are "
                                "resized once, image files when read; default: the dataset's own (32 for cifar and "
                                "svhn, the arrays' for npz), 224 for imagefolder")
    augment: Literal["auto", "crop_flip", "resized_crop", "none"] = Field(
        "auto", description="training augmentation: crop_flip (zero-pad 4, random crop, flip), resized_crop (random "
                            "resized crop and flip; evaluation then centre-crops 87.5%), none; auto: crop_flip up to "
                            "64 px, resized_crop above")
    loader: Literal["auto", "resident", "stream"] = Field(
        "auto", description="resident: the whole split as uint8 on the training device; stream: DataLoader workers "
                            "decode and augment on the CPU; auto: resident when the split fits in a quarter of the "
                            "free GPU memory (always for arrays on the CPU), else stream")
    workers: int | None = Field(None, ge=0, description="worker processes of the streaming loader (and of decoding "
                                                        "image files for a resident split); default: min(8, CPUs)")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from .registry import DATASETS

        if v not in DATASETS:
            raise ValueError(DATASETS.unknown(v))
        return v

    @field_validator("data_dir")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(
                f"data_dir {v!r} does not exist: point it at a folder with train.npz and test.npz (x uint8 "
                "N,H,W,3; y integer labels) or, for imagefolder, with train/<class>/* and val/<class>/*; or unset "
                "it and set download = true for torchvision's CIFAR or SVHN"
            )
        return v


class ModelConfig(_Strict):
    """A network by timm name (or torchvision / RobustBench name, see ``source``), optionally with weights from
    a checkpoint. It takes [0, 1] images: pretrained weights bring their normalisation and input size."""

    model: str
    checkpoint: str | None = None
    source: Literal["timm", "torchvision", "robustbench"] = Field(
        "timm", description="where the model comes from (robustbench needs the optional robustbench package)")
    pretrained: bool = Field(False, description="timm: the model's published weights; torchvision: its DEFAULT "
                                                "weights (downloaded on first use, then cached)")
    weights: str | None = Field(None, description="timm: a local file of the pretrained weights; torchvision: a "
                                                  "weights name (IMAGENET1K_V2); robustbench: [MODEL_DIR/]"
                                                  "DATASET/THREAT_MODEL, e.g. cifar10/Linf (MODEL_DIR: models)")
    resize: bool = Field(False, description="resize the images to the size the weights take (otherwise a size "
                                            "mismatch is an error)")

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"checkpoint {v!r} not found: check the path, or train that teacher first")
        return v

    @model_validator(mode="after")
    def _weights(self) -> ModelConfig:
        if self.source == "timm" and self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"weights {self.weights!r} not found: for timm, weights is a local file of the "
                             "pretrained weights (or unset it and set pretrained = true to download them)")
        if self.source == "robustbench":
            if self.weights is None or len(Path(self.weights).parts) < 2:
                raise ValueError(f"robustbench model {self.model!r} needs weights = '[MODEL_DIR/]DATASET/"
                                 "THREAT_MODEL', e.g. 'cifar10/Linf' (MODEL_DIR defaults to models)")
            if self.checkpoint is not None:
                raise ValueError(f"robustbench models read their weights from MODEL_DIR/DATASET/THREAT_MODEL/"
                                 f"{self.model}.pt: place the file there and unset checkpoint")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> Any:
        """The pretrained-model fields left at their defaults are not written: configs (and their digests)
        stay as they were before these fields existed."""
        d = handler(self)
        for key in ("source", "pretrained", "weights", "resize"):
            if isinstance(d, dict) and key in d and d[key] == type(self).model_fields[key].default:
                del d[key]
        return d


class EvalConfig(_Strict):
    """The robustness evaluation. In an experiment config: the table ``multiteach eval`` runs on the run's
    checkpoints (its flags override each setting); training reads ``batch_size`` (validation)."""

    eps: float = Field(8 / 255, ge=0, allow_inf_nan=False, description="L-inf radius of the attacks")
    n: int | None = Field(None, ge=1, description="first n test images (default: all)")
    batch_size: int = Field(256, ge=1, description="images per batch in validation and evaluation")
    attacks: list[str | dict[str, Any]] = Field(default_factory=lambda: ["fgsm", "pgd_sat", "pgd_trades", "cw_inf"],
                               description="rows of the robustness table")
    surrogate: ModelConfig | None = Field(None, description="source model of the transfer attacks")
    square_queries: int = Field(5000, ge=1, description="query budget of the Square attack")
    tf32: bool = Field(False, description="allow TF32 on Ampere and later GPUs (faster; every table says so); "
                                          "default: strict fp32")


SCHEDULE_SHAPE = frozenset({"milestones", "schedule", "hold_fraction", "cycle_momentum"})


def scaled_milestones(milestones: Sequence[int], official_epochs: int, epochs: int) -> list[int]:
    """A piecewise schedule's milestones at the same shares of another epoch count (each decay kept)."""
    return [max(1, round(m * epochs / official_epochs)) for m in milestones]


class ExperimentConfig(_Strict):
    """One training run: a preset with its options, the student, named teachers, data, loop, evaluation."""

    preset: str = "mtard"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the preset")
    student: ModelConfig = ModelConfig(model="cifar_resnet18")
    teachers: dict[str, ModelConfig] = Field(default_factory=dict)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str = Field("runs/mtard", min_length=1, description="where checkpoints and logs go")

    @model_validator(mode="before")
    @classmethod
    def _official_schedule(cls, data: Any) -> Any:
        """The preset's official training settings for what ``train`` leaves unset, the same from the Python API, a
        config file and the CLI. The schedule's shape (schedule, milestones, hold_fraction, cycle_momentum) comes
        as a whole, only when ``train`` sets none of those: a shape of the user's is never mixed with the
        preset's. Epochs alone keep the preset's shape, its milestones moved to the same shares of the new
        epochs (300 epochs decayed at 215 and 260 become 100 decayed at 72 and 87). Other settings (``epochs``,
        ``select``, ``lr``, ...) apply one by one."""
        from .registry import PRESETS

        if not isinstance(data, dict) or data.get("preset", "mtard") not in PRESETS:
            return data  # the field validators report what is wrong
        official = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in PRESETS[data.get("preset", "mtard")].schedule.items()}
        train = data.get("train", {})
        given = set(train.model_fields_set) if isinstance(train, TrainConfig) else \
            set(train) if isinstance(train, dict) else set()
        missing = {k: v for k, v in official.items() if k not in SCHEDULE_SHAPE and k not in given}
        if not given & SCHEDULE_SHAPE:
            missing.update({k: v for k, v in official.items() if k in SCHEDULE_SHAPE})
            epochs = train.epochs if isinstance(train, TrainConfig) else train.get("epochs") \
                if isinstance(train, dict) else None
            if "epochs" in given and official.get("milestones") and isinstance(epochs, int) and epochs >= 1:
                missing["milestones"] = scaled_milestones(official["milestones"], official.get("epochs", 300), epochs)
        if isinstance(train, TrainConfig):
            train = TrainConfig.model_validate({**train.model_dump(exclude_unset=True), **missing})
        elif isinstance(train, dict):
            train = {**missing, **train}
        return {**data, "train": train}

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        from .registry import PRESETS

        if v not in PRESETS:
            raise ValueError(PRESETS.unknown(v))
        return v

    @model_validator(mode="after")
    def _teachers(self) -> ExperimentConfig:
        from .registry import PRESETS

        need = PRESETS[self.preset].teachers
        missing = [t for t in need if t not in self.teachers]
        if missing:
            raise ValueError(
                f"preset {self.preset!r} needs teacher(s) {', '.join(missing)}: add [teachers.{missing[0]}] "
                f"with model = '...' and checkpoint = 'path.pt'"
            )
        extra = [t for t in self.teachers if t not in need]
        if extra:
            raise ValueError(f"preset {self.preset!r} takes teachers {list(need)}, not {extra}")
        return self

    def digest(self) -> str:
        """Hash of everything that shapes the trajectory (not where it is logged or shown)."""
        return hashlib.sha256(json.dumps(digested(self.model_dump(mode="json")), sort_keys=True).encode()
                              ).hexdigest()[:16]


def planned_checkpoints(cfg: ExperimentConfig, checkpoints: dict[str, str | None]) -> ExperimentConfig:
    """``cfg`` with its teachers' checkpoints set to files that need not exist yet (a config planned before its
    teachers are trained, or written for later): validated without them, the paths set unchecked."""
    return cfg.model_copy(update={"teachers": {r: t.model_copy(update={"checkpoint": checkpoints.get(r)})
                                               for r, t in cfg.teachers.items()}})


def digested(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config (as dumped, or as a checkpoint records it) that :meth:`ExperimentConfig.digest`
    hashes: what shapes the trajectory, not where it is logged or shown."""
    d = json.loads(json.dumps(config))  # a deep copy
    d.pop("run_dir", None)
    d.pop("eval", None)
    train, data = d.setdefault("train", {}), d.setdefault("data", {})
    train.pop("progress", None)
    train.pop("time_budget_s", None)  # varies with the time left when the stage starts: stage_budget_s names it
    if train.get("optimizer") == "sgd" and not train.get("optimizer_options"):  # digests of runs written
        train.pop("optimizer"), train.pop("optimizer_options", None)  # before these fields existed still match
    data.pop("workers", None)  # how fast data is decoded, not what it is
    newer = {"train": (("hold_fraction", 0.0), ("cycle_momentum", None), ("stage_budget_s", None)),
             "data": (("image_size", None), ("augment", "auto"), ("loader", "auto"))}
    for table, fields in newer.items():
        for key, default in fields:
            if d[table].get(key) == default:  # at their defaults, newer fields leave older digests as they were
                d[table].pop(key, None)
    for model in [d.get("student", {}), *d.get("teachers", {}).values()]:
        for key, default in (("source", "timm"), ("pretrained", False), ("weights", None), ("resize", False)):
            if model.get(key) == default:
                model.pop(key, None)
    return d


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML or JSON file as a dict (validated later, once overrides are applied)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} not found (write one with: multiteach config PRESET)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        d = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {str(p)!r} is not valid {p.suffix[1:].upper() or 'TOML'}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(p)!r} must hold a table of settings at its top level, not a "
                         f"{type(d).__name__}")
    return d


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as TOML, else taken as a string) to a nested dict."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {p!r} is not a table")
    node[leaf] = value


def to_toml(d: dict[str, Any], model: type[BaseModel] | None = None) -> str:
    """Write a config dict as TOML (with tomlkit), each setting with its one-line description as a comment.

    Settings whose value is None (TOML has no null) are written commented out, as ``# key = ...  # unset:
    description``, so a user sees every field of ``model`` (default :class:`ExperimentConfig`) in the file.
    The text reads back (``tomllib``) into the same dict, less its None values."""
    import tomlkit

    doc = tomlkit.document()
    _fill_table(doc, d, ExperimentConfig if model is None else model)
    return tomlkit.dumps(doc)


def _fill_table(table: Any, d: dict[str, Any], model: type[BaseModel] | None) -> None:
    import tomlkit

    fields = model.model_fields if model is not None else {}
    for key, value in d.items():  # scalars first: in TOML a table's keys come before its sub-tables
        if isinstance(value, dict):
            continue
        info = fields.get(key)
        desc = _description(info)
        if value is None:
            example = _example(info)
            table.add(tomlkit.comment(f"{key} = {example}  # unset" + (f": {desc}" if desc else "")))
            continue
        item = tomlkit.item(list(value) if isinstance(value, tuple) else value)
        if desc:
            item.comment(desc)
            item.trivia.comment_ws = "  "
        table.add(key, item)
    for key, value in d.items():
        if not isinstance(value, dict):
            continue
        info = fields.get(key)
        sub_model, of_tables = _table_model(info)
        has_scalars = any(not isinstance(v, dict) for v in value.values())
        sub = tomlkit.table(is_super_table=bool(value) and not has_scalars)
        if of_tables:
            for name, entry in value.items():
                child = tomlkit.table()
                _fill_table(child, entry if isinstance(entry, dict) else {}, sub_model)
                sub.add(name, child)
        else:
            _fill_table(sub, value, sub_model)
        desc = _description(info)
        if desc and not sub.is_super_table():
            sub.comment(desc)
            sub.trivia.comment_ws = "  "
        table.add(key, sub)


def _description(info: Any) -> str:
    desc = getattr(info, "description", None) or ""
    return " ".join(desc.split())


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _example(info: Any) -> str:
    """A placeholder for an unset field: ``...``, ``"..."`` for text, an inline table for a model."""
    import typing

    annotation = getattr(info, "annotation", None)
    models = _models_in(annotation)
    if models:
        return "{" + ", ".join(f"{k} = ..." for k in models[0].model_fields) + "}"
    return '"..."' if str in (typing.get_args(annotation) or (annotation,)) else "..."


def _table_model(info: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model of a table field, and whether the table maps names to such models (``teachers``)."""
    import typing

    annotation = getattr(info, "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    models = _models_in(annotation)
    if models:
        return models[0], False
    if typing.get_origin(annotation) is dict:
        value_models = _models_in(typing.get_args(annotation)[-1]) if typing.get_args(annotation) else []
        if value_models:
            return value_models[0], True
    return None, False


__all__ = ["DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig", "TrainConfig", "apply_override", "digested",
           "planned_checkpoints", "read_config", "to_toml"]
