"""The training loop, the same for every recipe: SGD, LR schedule, AMP, checkpoints, metrics, evaluation.

It knows no recipe: it calls ``recipe(x, y) -> (total, losses, weights)`` and steps the optimizer.
Host syncs happen only every ``log_every`` steps (per-step losses and weights are buffered on the device).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from .budget import Clock, EpochPlanner
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, remove_stale_temps
from .config import TrainConfig
from .data import TensorLoader
from .distributed import DistContext
from .evaluate import clean_and_pgd
from .fast import accelerate
from .recipe import Recipe
from .rundir import RunLock
from .runtime import (
    StopFlag,
    autocast,
    resolve_device,
    resolve_precision,
    rng_state,
    set_rng_state,
    stop_on_signals,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class ConfigMismatchError(ValueError):
    """Resuming a run whose checkpoint was written under another configuration."""


@dataclass
class TrainResult:
    status: str  # "finished" or "interrupted (SIGTERM)"
    epoch: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def _selection_score(metrics: dict[str, float], select: str) -> float:
    return {"w_robust": metrics.get("w_robust", 0.0), "robust": metrics.get("robust", 0.0),
            "clean": metrics.get("clean", 0.0)}[select]


class Trainer:
    """Trains ``recipe.student`` on ``train_loader``; checkpoints, logs and resumes under ``run_dir``."""

    def __init__(
        self,
        recipe: Recipe,
        train_loader: TensorLoader,
        config: TrainConfig | None = None,
        *,
        val_loader: TensorLoader | None = None,
        run_dir: str | Path | None = None,
        experiment: dict[str, Any] | None = None,
        dist: DistContext | None = None,
        console: Console | None = None,
        sync_bn: bool = False,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.cfg = (config or TrainConfig()).model_copy()  # a budgeted run changes its epochs: not the caller's
        self.recipe = recipe
        self.loader, self.val_loader = train_loader, val_loader
        self.dist = dist or DistContext()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.experiment = experiment or {}
        self.console = console or Console(stderr=True)
        self.device = resolve_device(self.cfg.device)
        if self.loader.device.type != self.device.type:
            raise ValueError(f"the training data is on {self.loader.device}, the run on {self.device}: build the "
                             "loaders with the same device")
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.channels_last = self.cfg.channels_last if self.cfg.channels_last is not None \
            else self.device.type == "cuda"
        sync_bn = sync_bn or self.cfg.sync_bn
        if sync_bn and self.dist.enabled:
            recipe.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(recipe.student)
        recipe.to(self.device)
        if self.channels_last:
            recipe.to(memory_format=torch.channels_last)
        self.ema = _make_ema(recipe.student, self.cfg.ema_decay)  # a plain copy, before any fast-path view
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.cfg.fast and self.device.type == "cuda":
            accelerate(recipe, self.precision, graphs=not sync_bn, compile=self.cfg.compile)
        self.train_model = self.dist.wrap(recipe.student)
        if self.dist.enabled:
            recipe.loss_sync = self.dist.mean  # the weighter sees the global batch's losses on every rank
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)
        student_params, extra_params = recipe.trainable_parameters()
        self.extra_params = extra_params
        groups = [{"params": student_params, "weight_decay": self.cfg.weight_decay}]
        if extra_params:
            groups.append({"params": extra_params, "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                         nesterov=self.cfg.nesterov, **self._sgd_impl())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.steps_per_epoch = min(len(self.loader), self.cfg.steps_per_epoch or len(self.loader))
        if self.steps_per_epoch < 1:
            raise ValueError("the training split yields no batch: lower batch_size or use more images")
        self.epoch, self.global_step = 0, 0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._records: list[tuple[int, int, float, Tensor, Tensor, Tensor]] = []
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._writer = None
        self.planner: EpochPlanner | None = None
        if self.cfg.time_budget_s is not None:
            self.planner = EpochPlanner(self.cfg.time_budget_s, self.steps_per_epoch, max_epochs=self.cfg.epochs,
                                        clock=clock, sync=self._sync)
            self.planner.begin()  # the budget counts from here: warm-up, autotuning and graph capture included

    # ---------------------------------------------------------------- setup helpers
    def _sgd_impl(self) -> dict[str, bool]:
        if self.device.type == "cuda":
            return {"fused": True}
        return {"foreach": True}

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _lr_at(self, step: int) -> float:
        return self.cfg.lr * self.cfg.lr_factor(step / self.steps_per_epoch)

    # ---------------------------------------------------------------- checkpoints
    def _state(self, step_in_epoch: int) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "student": self.recipe.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "recipe": self.recipe.component_state(),
            "loader": self.loader.state_dict(),  # its generator too at an epoch boundary: the next order
            "rng": rng_state(),
            "best": self.best,
            "history": self.history,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "planned_epochs": self.planner.epochs if self.planner is not None else None,
            "experiment": self.experiment,
            "branches": self.recipe.branch_names,
        }

    def save(self, name: str = "last.pt", step_in_epoch: int = 0) -> Path | None:
        if self.run_dir is None or not self.is_main:
            return None
        return atomic_save(self._state(step_in_epoch), self.run_dir / name)

    def _resume(self, force: bool) -> None:
        path = self.run_dir / "last.pt" if self.run_dir else None
        if path is None or not path.exists():
            return
        if not path.is_file():
            raise CheckpointError(f"{path} is not a file: remove it (or use another run_dir) to start afresh")
        ckpt = load_checkpoint(path, map_location=self.device)
        if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
            raise CheckpointError(f"{path} is not a multiteach training checkpoint: remove it, or use another "
                                  "run_dir")
        if ckpt.get("branches") != self.recipe.branch_names:
            raise ConfigMismatchError(f"{path} was written by a recipe with branches {ckpt.get('branches')}, "
                                      f"this one has {self.recipe.branch_names}: use another run_dir")
        old, new = ckpt.get("experiment") or {}, self.experiment
        if old.get("digest") != new.get("digest") and not force:
            diff = _diff(old.get("config", {}), new.get("config", {}))
            raise ConfigMismatchError(
                f"{path} was written under another configuration ({'; '.join(diff[:4]) or 'different digest'}): "
                "resume with the original config, use a new run_dir, or force the resume (--force)"
            )
        try:
            self.recipe.student.load_state_dict(ckpt["student"])
        except RuntimeError as e:
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
            raise CheckpointError(f"{path} holds a student of another shape ({first}): it was written by another "
                                  "model or class count; use another run_dir") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.recipe.load_component_state(ckpt["recipe"])
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.best, self.history = ckpt["best"], ckpt["history"]
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ConfigMismatchError(f"{path} holds no EMA weights: resume with ema_decay unset, or use a new "
                                          "run_dir")
            self.ema.module.load_state_dict(ckpt["ema"])
        if self.planner is not None and ckpt.get("planned_epochs"):
            self.cfg.epochs = self.planner.epochs = int(ckpt["planned_epochs"])
        if ckpt["loader"] is not None:
            self.loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self._truncate_metrics()
        self._repair_best(ckpt)
        if self.is_main:
            where = f"epoch {self.epoch + 1}, step {ckpt['step_in_epoch'] + 1}"
            self.console.log(f"resumed from {path} at {where}")

    # ---------------------------------------------------------------- metrics
    def _metrics_path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None and self.is_main else None

    def _write(self, records: list[dict[str, Any]]) -> None:
        path = self._metrics_path()
        if path is None or not records:
            return
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        if self._writer is not None:
            for r in records:
                if r["type"] == "step":
                    self._writer.add_scalar("loss/total", r["loss"], r["step"])
                    for name, li, wi in zip(self.recipe.branch_names, r["L"], r["w"]):
                        self._writer.add_scalar(f"loss/{name}", li, r["step"])
                        self._writer.add_scalar(f"weight/{name}", wi, r["step"])
                else:
                    for k, v in r.items():
                        if isinstance(v, float):
                            self._writer.add_scalar(f"epoch/{k}", v, r["epoch"])

    def _truncate_metrics(self) -> None:
        """After a resume, drop records written after the checkpoint, so the log reads as one run."""
        path = self._metrics_path()
        if path is None or not path.is_file():
            return
        keep = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-write: the checkpoint does not include it anyway
                warnings.warn(f"{path}: dropped unreadable line {n} ({line[:40]!r})", stacklevel=2)
                continue
            if (r["type"] == "step" and r["step"] <= self.global_step) or \
               (r["type"] == "epoch" and r["epoch"] <= self.epoch):
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))

    def _flush(self) -> dict[str, Any] | None:
        """One host sync: write the buffered per-step records, check for a non-finite loss."""
        if not self._records:
            return None
        steps, epochs, lrs, totals, losses, weights = zip(*self._records)
        totals_l = torch.stack(totals).tolist()
        losses_l = torch.stack(losses).tolist()
        weights_l = torch.stack(weights).tolist()
        self._records.clear()
        self._write([{"type": "step", "step": s, "epoch": e, "lr": lr, "loss": t, "L": li, "w": wi}
                     for s, e, lr, t, li, wi in zip(steps, epochs, lrs, totals_l, losses_l, weights_l)])
        if bool(self._bad):
            bad_at = next((s for s, t in zip(steps, totals_l) if not math.isfinite(t)), steps[-1])
            last = self.run_dir / "last.pt" if self.run_dir is not None else None
            kept = f"the last good checkpoint is {last}" if last is not None and last.is_file() else \
                "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad_at} (epoch {self.epoch + 1}); training stopped and "
                f"{kept}. Lower the learning rate, or train in fp32 / bf16 instead of fp16."
            )
        return {"loss": totals_l[-1], "L": losses_l[-1], "w": weights_l[-1]}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Clean and PGD-20 accuracy on the validation split, in fp32, in eval mode (default: the student)."""
        if self.val_loader is None:
            return {}
        model = self.recipe.student if model is None else model
        m = clean_and_pgd(model, self.val_loader, steps=self.cfg.eval_pgd_steps, dist=self.dist)
        if m:
            m["w_robust"] = (m["clean"] + m["robust"]) / 2
        return m

    def _validate(self, record: dict[str, Any]) -> torch.nn.Module | None:
        """Validate the raw (and EMA) weights; returns the model that beats the best so far, if one does."""
        candidates = {"raw": self.recipe.student}
        if self.ema is not None:
            candidates["ema"] = self.ema.module
        new_best = None
        for tag, model in candidates.items():
            metrics = self.evaluate(model)
            prefix = "val_" if tag == "raw" else "val_ema_"
            record.update({f"{prefix}{k}": v for k, v in metrics.items()})
            score = _selection_score(metrics, self.cfg.select) if metrics else None
            if score is not None and score > self.best.get("score", -1.0):
                self.best = {"epoch": self.epoch, "score": score, "weights": tag, **metrics}
                new_best = model
        return new_best

    def _write_best(self, model: torch.nn.Module) -> None:
        """best.pt from ``model`` (the student or its EMA), after last.pt records it as the best: a kill between
        the two writes leaves a last.pt from which ``_resume`` rewrites best.pt."""
        if self.run_dir is not None and self.is_main:
            metrics = {k: v for k, v in self.best.items() if k not in ("epoch", "score", "weights")}
            atomic_save({"student": model.state_dict(), "epoch": self.best["epoch"], "metrics": metrics,
                         "weights": self.best["weights"], "experiment": self.experiment}, self.run_dir / "best.pt")

    def _repair_best(self, ckpt: dict[str, Any]) -> None:
        """A kill between last.pt and best.pt at the end of the best epoch: rewrite best.pt from last.pt."""
        path = self.run_dir / "best.pt" if self.run_dir is not None else None
        if path is None or not self.is_main or self.best.get("epoch") != ckpt["epoch"] or ckpt["step_in_epoch"]:
            return
        try:
            current = load_checkpoint(path).get("epoch") if path.is_file() else None
        except CheckpointError:
            current = None
        if current != self.best["epoch"]:
            self._write_best(self.ema.module if self.best.get("weights") == "ema" and self.ema is not None
                             else self.recipe.student)
            self.console.log(f"rewrote {path} (epoch {self.best['epoch']}) from {path.parent / 'last.pt'}")

    # ---------------------------------------------------------------- the loop
    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
            disable=not (self.cfg.progress and self.is_main), transient=False,
        )

    def fit(self, resume: bool = True, force: bool = False) -> TrainResult:
        """Train to ``config.epochs``, resuming from ``run_dir/last.pt`` when it exists. On SIGINT/SIGTERM it
        saves a mid-epoch checkpoint and returns with status ``"interrupted (...)"``."""
        lock = contextlib.nullcontext()
        if self.run_dir is not None and self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"run_dir {str(self.run_dir)!r} cannot be used ({e.strerror}): choose another "
                                 "folder") from None
            lock = RunLock(self.run_dir)  # one training per run_dir (rank 0 holds it)
        with lock:
            return self._fit(resume, force)

    def _fit(self, resume: bool, force: bool) -> TrainResult:
        if self.run_dir is not None and self.is_main:
            for tmp in remove_stale_temps(self.run_dir):
                self.console.log(f"removed {tmp.name}, left by a process killed while writing a checkpoint")
        if resume:
            self._resume(force)
        if self.global_step == 0 and self._metrics_path() is not None:
            self._metrics_path().unlink(missing_ok=True)  # a fresh start (or --restart) starts a fresh log
        if self.run_dir is not None and self.is_main:
            info = {"recipe": self.recipe.name, "branches": self.recipe.branch_names, "experiment": self.experiment,
                    "train": self.cfg.model_dump(mode="json")}
            (self.run_dir / "run.json").write_text(json.dumps(info, indent=2))
        self._open_tensorboard()
        status = "finished"
        with stop_on_signals() as stop, self._progress() as progress, self.dist.lost_rank_guard():
            while self.epoch < self.cfg.epochs:
                if not self._run_epoch(stop, progress):
                    status = f"interrupted ({stop.name or 'signal on another rank'})"
                    break
                self._end_epoch()
                if stop.requested:
                    self.save()  # also between the epochs checkpoint_every writes
                    status = f"interrupted ({stop.name})"
                    break
            self.dist.barrier()
        if self._writer is not None:
            self._writer.close()
        return TrainResult(status, self.epoch, self.global_step, self.history, self.best, self.run_dir)

    def _stop_requested(self, stop: StopFlag) -> bool:
        if not self.dist.enabled:
            return stop.requested
        # ranks agree on stopping every log_every steps (one tiny all-reduce), so they stop at the same step
        return self.global_step % self.cfg.log_every == 0 and self.dist.any(stop.requested, self.device)

    def _run_epoch(self, stop: StopFlag, progress: Progress) -> bool:
        """One epoch (or its rest, after a mid-epoch resume); False when interrupted and saved."""
        self.recipe.train()
        self._t0, self._seen = time.perf_counter(), 0
        start = self.loader.position
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=self.steps_per_epoch,
                                 completed=start, info="")
        self._last: dict[str, Any] | None = None
        for i, (x, y) in enumerate(self.loader, start=start):
            if i >= self.steps_per_epoch:
                break
            self._last = self._step(x, y) or self._last
            self._seen += len(y) * self.dist.world
            progress.update(task, advance=1)
            if self._last is not None and self.global_step % self.cfg.log_every == 0:
                progress.update(task, info=self._status_line())
            if i + 1 < self.steps_per_epoch and self._stop_requested(stop):
                self._flush()
                self.save(step_in_epoch=i + 1)
                return False
        self.loader.end_epoch()  # an epoch cut short by steps_per_epoch starts afresh next time
        return True

    def _status_line(self) -> str:
        rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
        last = self._last or {"L": [], "w": []}
        parts = [f"L_{n}={li:.4f} w_{n}={wi:.3f}" for n, li, wi in zip(self.recipe.branch_names, last["L"], last["w"])]
        return " ".join(parts) + f" {rate:,.0f} img/s"

    def _end_epoch(self) -> None:
        self._last = self._flush() or self._last
        elapsed = time.perf_counter() - self._t0
        self.epoch += 1
        self.recipe.on_epoch_end()
        record: dict[str, Any] = {"type": "epoch", "epoch": self.epoch, "time_s": elapsed,
                                  "img_per_s": self._seen / max(elapsed, 1e-9)}
        if self._last is not None:
            record.update(loss=self._last["loss"], L=self._last["L"], w=self._last["w"])
        if self.planner is not None:
            self._set_epochs(self.planner.on_epoch_end(self.epoch, self.cfg.epochs), "behind its budget")
        new_best = None
        if self.cfg.eval_every and (self.epoch % self.cfg.eval_every == 0 or self.epoch >= self.cfg.epochs):
            new_best = self._validate(record)
        self.history.append(record)
        self._write([record])
        if new_best is not None or self.epoch % self.cfg.checkpoint_every == 0 or self.epoch >= self.cfg.epochs:
            self.save()  # last.pt first, then best.pt: the pair never disagrees (see _repair_best)
        if new_best is not None:
            self._write_best(new_best)
        if self.is_main:
            self.console.log(_epoch_line(record, self.recipe.branch_names))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _set_epochs(self, epochs: int, why: str) -> None:
        """Adopt a budgeted epoch count; under DDP every rank takes rank 0's, so all stop together."""
        if self.dist.enabled:
            mine = torch.tensor([float(epochs if self.is_main else 0)], device=self.device)
            epochs = int(self.dist.sum(mine).item())
        if epochs == self.cfg.epochs:
            return
        self.cfg.epochs = epochs
        if self.is_main:
            self.console.log(f"time budget {self.cfg.time_budget_s:.0f} s: {epochs} epochs ({why})")

    def _open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.is_main and self.run_dir is not None):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard = true needs the tensorboard package: "
                             "pip install 'multiteach[tensorboard]'") from None
        self._writer = SummaryWriter(str(self.run_dir / "tb"))

    def _step(self, x: Tensor, y: Tensor) -> dict[str, Any] | None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self._lr_at(self.global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.recipe.on_lr(lr / self.cfg.lr)
        with autocast(self.precision, self.device):
            out = self.recipe(x, y, model=self.train_model)
        self._bad |= ~torch.isfinite(out.total)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        self.dist.sync_grads(self.extra_params)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.recipe.student, step=self.global_step)
        if self.planner is not None:
            planned = self.planner.on_step(self.global_step / self.steps_per_epoch)
            if planned is not None:
                self._set_epochs(planned, f"{self.planner.step_s * 1e3:.1f} ms/step measured")
        self._records.append((self.global_step, self.epoch + 1, lr, out.total.detach(), out.losses, out.weights))
        if self.global_step % self.cfg.log_every == 0:
            return self._flush()
        return None


def _epoch_line(r: dict[str, Any], names: list[str]) -> str:
    parts = [f"epoch {r['epoch']}", f"{r['time_s']:.1f}s", f"{r['img_per_s']:,.0f} img/s"]
    if "L" in r:
        parts += [f"L_{n}={li:.4f} w_{n}={wi:.3f}" for n, li, wi in zip(names, r["L"], r["w"])]
    if "val_clean" in r:
        parts.append(f"val clean {100 * r['val_clean']:.2f} robust {100 * r['val_robust']:.2f}")
    if "val_ema_clean" in r:
        parts.append(f"EMA {100 * r['val_ema_clean']:.2f} / {100 * r['val_ema_robust']:.2f}")
    return " | ".join(parts)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _make_ema(model: torch.nn.Module, decay: float | None) -> Any:
    """timm's ModelEmaV3 (parameters and buffers), its decay warmed up as 1 - (1 + step)^-3/4 up to ``decay``,
    so a short run averages over its last few hundred steps and a long one over ~1 / (1 - decay) steps."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)


__all__ = ["ConfigMismatchError", "NonFiniteLossError", "TrainResult", "Trainer"]
