"""Validated configuration (pydantic): the same models back the Python API, TOML/JSON files and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    schedule: Literal["piecewise", "cosine", "constant"] = "piecewise"
    milestones: list[int] = Field(default_factory=lambda: [215, 260, 285])
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
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
        """LR / base LR at a (fractional) epoch: linear warmup, then piecewise, cosine or constant."""
        if self.warmup_epochs and epoch_progress < self.warmup_epochs:
            return (epoch_progress + 1e-9) / self.warmup_epochs
        if self.schedule == "piecewise":
            return self.gamma ** sum(epoch_progress >= m for m in self.milestones)
        if self.schedule == "cosine":
            import math

            span = max(self.epochs - self.warmup_epochs, 1e-9)
            return 0.5 * (1 + math.cos(math.pi * min((epoch_progress - self.warmup_epochs) / span, 1.0)))
        return 1.0


class DataConfig(_Strict):
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    data_dir: str | None = Field(None, description="folder with train.npz/test.npz (x uint8 NHWC, y)")
    root: str = Field("data", description="torchvision download folder when data_dir is not set")
    download: bool = False
    val_size: int = Field(1000, ge=0, description="training images held out for model selection")
    train_size: int | None = Field(None, ge=1, description="use only this many training images (quick runs)")
    test_size: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the validation split and the train_size subset")

    @field_validator("data_dir")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(
                f"data_dir {v!r} does not exist: point it at a folder with train.npz and test.npz (x uint8 "
                "N,32,32,3; y integer labels), or unset it and set download = true for torchvision's CIFAR"
            )
        return v


class ModelConfig(_Strict):
    """A network by timm name, optionally with weights from a checkpoint."""

    model: str
    checkpoint: str | None = None

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"checkpoint {v!r} not found: check the path, or train that teacher first")
        return v


class EvalConfig(_Strict):
    eps: float = Field(8 / 255, ge=0)
    n: int | None = Field(None, ge=1, description="first n test images (default: all)")
    batch_size: int = Field(256, ge=1)
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd_sat", "pgd_trades", "cw_inf"])
    surrogate: ModelConfig | None = None
    square_queries: int = Field(5000, ge=1)


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

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        from .presets import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}: choose one of {', '.join(sorted(PRESETS))}")
        return v

    @model_validator(mode="after")
    def _teachers(self) -> ExperimentConfig:
        from .presets import PRESETS

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
        d = self.model_dump(mode="json")
        d.pop("run_dir")
        d["train"].pop("progress")
        d["train"].pop("time_budget_s")  # a budgeted run's cache entry is reused under another budget
        d.pop("eval")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


def to_toml(d: dict[str, Any]) -> str:
    """Write a config dict as TOML (tables after scalars; None values left out)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(d, "")
    return "\n".join(lines).lstrip() + "\n"


__all__ = ["DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig", "TrainConfig", "apply_override",
           "read_config", "to_toml"]
