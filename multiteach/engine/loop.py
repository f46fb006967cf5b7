"""The training loop, the same for every recipe: epochs, steps, the recipe's step, backward, optimizer steps.

It knows no recipe: it calls ``recipe(x, y) -> (total, losses, weights)``, back-propagates once and steps
the student's optimizer and each trainable teacher's. Its collaborators each hold one job: ``optim``
(optimizers and the LR schedule), ``Checkpointer`` (files, resume checks, the lock), ``RunLog`` (metrics,
TensorBoard, progress), ``Validator`` (validation and selection), ``runtime`` (device, precision, signals),
``EpochPlanner`` (a time budget). Host syncs happen only every ``log_every`` steps (per-step losses and
weights are buffered on the device).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from ..budget import Clock, EpochPlanner
from ..checkpoint import CheckpointError, atomic_write_json
from ..config import TrainConfig, scaled_milestones
from ..data import TensorLoader
from ..distributed import DistContext
from ..fast import accelerate
from ..recipe import Recipe
from ..runtime import autocast, resolve_device, resolve_precision, rng_state, set_rng_state
from ..signals import StopFlag, stop_on_signals
from .checkpointer import Checkpointer, ConfigMismatchError
from .optim import cycled_momentum, lr_scales, set_lr, student_optimizer, teacher_optimizer
from .runlog import RunLog, epoch_line, progress_bar, status_line
from .validator import Validator, threat_model


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    status: str  # "finished" or "interrupted (SIGTERM)"
    epoch: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


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
        self.cfg = (config or TrainConfig()).model_copy(deep=True)  # a budgeted run changes its epochs and
        self._configured_schedule = (self.cfg.epochs, list(self.cfg.milestones))  # milestones: not the caller's
        self.recipe = recipe
        self.loader = train_loader
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
        self._prepare_recipe(sync_bn or self.cfg.sync_bn)
        self.checkpoints = Checkpointer(self.run_dir, self.is_main, self.console)
        self.log = RunLog(self.run_dir, recipe.branch_names, enabled=self.is_main, tensorboard=self.cfg.tensorboard)
        self.validator = Validator(val_loader, self.cfg.eval_pgd_steps, self.cfg.select, self.dist,
                                   threat_model(recipe))
        student_params, self.extra_params = recipe.trainable_parameters()
        self.optimizer = student_optimizer(self.cfg, student_params, self.extra_params, self.device,
                                           lr_scales(recipe.student))
        self.teacher_optimizers = [teacher_optimizer(t.optimizer, t.parameters(), self.device)
                                   for t in recipe.trainable_teachers]
        self._lr_bases = [(self.optimizer, None)] + [(opt, t.optimizer.get("lr", 0.1)) for opt, t in
                                                      zip(self.teacher_optimizers, recipe.trainable_teachers)]
        self._synced = self.extra_params + [p for t in recipe.trainable_teachers for p in t.parameters()]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.steps_per_epoch = min(len(self.loader), self.cfg.steps_per_epoch or len(self.loader))
        if self.steps_per_epoch < 1:
            raise ValueError("the training split yields no batch: lower batch_size or use more images")
        self.epoch, self.global_step = 0, 0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._records: list[tuple[int, int, float, Tensor, Tensor, Tensor]] = []
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.planner: EpochPlanner | None = None
        if self.cfg.time_budget_s is not None:
            self.planner = EpochPlanner(self.cfg.time_budget_s, self.steps_per_epoch, max_epochs=self.cfg.epochs,
                                        clock=clock, sync=self._sync)
            self.planner.begin()  # the budget counts from here: warm-up, autotuning and graph capture included

    def _prepare_recipe(self, sync_bn: bool) -> None:
        """Device, memory format, the EMA copy, the CUDA fast path, DDP and compile, in that order."""
        recipe = self.recipe
        if sync_bn and self.dist.enabled:  # the one SyncBatchNorm path: batch statistics over the global batch
            recipe.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(recipe.student)
        recipe.to(self.device)
        if self.channels_last:
            recipe.to(memory_format=torch.channels_last)
        self.ema = _make_ema(recipe.student, self.cfg.ema_decay)  # a plain copy, before any fast-path view
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.cfg.fast and self.device.type == "cuda":
            accelerate(recipe, self.precision, graphs=not sync_bn, compile=self.cfg.compile,
                       log=self.console.log if self.is_main else None)
        self.train_model = self.dist.wrap(recipe.student)
        if self.dist.enabled:
            recipe.loss_sync = self.dist.mean  # the weighter sees the global batch's losses on every rank
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def val_loader(self) -> Any:
        return self.validator.loader

    # ---------------------------------------------------------------- checkpoints
    def _state(self, step_in_epoch: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "student": self.recipe.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "teacher_optimizers": [o.state_dict() for o in self.teacher_optimizers],
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
        return self.checkpoints.save(self._state(step_in_epoch), name)

    def _resume(self, force: bool) -> None:
        ckpt = self.checkpoints.load_last()
        if ckpt is None:
            return
        path = self.checkpoints.last
        self.checkpoints.check_compatible(ckpt, self.recipe.branch_names, self.experiment, force)
        try:
            self.recipe.student.load_state_dict(ckpt["student"])
        except RuntimeError as e:
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
            raise CheckpointError(f"{path} holds a student of another shape ({first}): it was written by another "
                                  "model or class count; use another run_dir") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for opt, state in zip(self.teacher_optimizers, ckpt.get("teacher_optimizers", [])):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.recipe.load_component_state(ckpt["recipe"])
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.best, self.history = ckpt["best"], ckpt["history"]
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ConfigMismatchError(f"{path} holds no EMA weights: resume with ema_decay unset, or use a new "
                                          "run_dir")
            self.ema.module.load_state_dict(ckpt["ema"])
        if ckpt.get("planned_epochs"):  # a budgeted run goes on with its plan, with or without a budget now: its
            self._adopt_epochs(int(ckpt["planned_epochs"]))  # schedule anneals over those epochs
            if self.planner is not None:
                self.planner.epochs = self.cfg.epochs
        if ckpt["loader"] is not None:
            self.loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self.log.truncate(self.global_step, self.epoch)
        if self.checkpoints.best_is_stale(ckpt, self.best):
            self._write_best(self.ema.module if self.best.get("weights") == "ema" and self.ema is not None
                             else self.recipe.student)
            self.console.log(f"rewrote {self.checkpoints.best} (epoch {self.best['epoch']}) from {path}")
        if self.is_main:
            self.console.log(f"resumed from {path} at epoch {self.epoch + 1}, step {ckpt['step_in_epoch'] + 1}")

    def _write_best(self, model: torch.nn.Module) -> None:
        self.checkpoints.write_best(model, self.best, self.experiment)

    # ---------------------------------------------------------------- validation
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Clean and PGD-k accuracy on the validation split, in eval mode (default: the student); fp32 with TF32
        allowed, as it selects models and reports no figure."""
        return self.validator.evaluate(self.recipe.student if model is None else model)

    def _validate(self, record: dict[str, Any]) -> torch.nn.Module | None:
        """Validate the raw (and EMA) weights; returns the model that beats the best so far, if one does."""
        candidates = {"raw": self.recipe.student}
        if self.ema is not None:
            candidates["ema"] = self.ema.module
        progress = getattr(self, "_progress", None)  # an indeterminate bar: validation takes seconds to minutes
        what = "clean" if self.cfg.select == "clean" else f"clean, PGD-{self.cfg.eval_pgd_steps}"
        task = progress.add_task(f"validating epoch {self.epoch} ({what})", total=None,
                                 info="") if progress is not None else None
        try:
            self.best, new_best = self.validator.validate(candidates, self.best, self.epoch, record)
        finally:
            if task is not None:
                progress.remove_task(task)
        return new_best

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = True, force: bool = False) -> TrainResult:
        """Train to ``config.epochs``, resuming from ``run_dir/last.pt`` when it exists. On SIGINT/SIGTERM it
        saves a mid-epoch checkpoint and returns with status ``"interrupted (...)"``."""
        with self.checkpoints.lock():
            return self._fit(resume, force)

    def _fit(self, resume: bool, force: bool) -> TrainResult:
        self.checkpoints.clean_temps()
        if resume:
            self._resume(force)
        if self.global_step == 0:
            self.log.clear()
        self._write_run_info()
        self.log.open()
        status = "finished"
        with stop_on_signals() as stop, progress_bar(self.console, self.cfg.progress and self.is_main) as progress, \
                self.dist.lost_rank_guard():
            self._progress = progress
            while self.epoch < self.cfg.epochs:
                if not self._run_epoch(stop, progress):
                    status = f"interrupted ({stop.name or 'signal on another rank'})"
                    break
                self._end_epoch()
                if self._stop_agreed(stop):  # every rank, or one would start the next epoch alone
                    self.save()  # also between the epochs checkpoint_every writes
                    status = f"interrupted ({stop.name or 'signal on another rank'})"
                    break
            self.dist.barrier()
        self.log.close()
        return TrainResult(status, self.epoch, self.global_step, self.history, self.best, self.run_dir)

    def _write_run_info(self) -> None:
        if self.run_dir is not None and self.is_main:
            info = {"recipe": self.recipe.name, "branches": self.recipe.branch_names, "experiment": self.experiment,
                    "train": self.cfg.model_dump(mode="json")}
            atomic_write_json(info, self.run_dir / "run.json")

    def _stop_requested(self, stop: StopFlag) -> bool:
        if not self.dist.enabled:
            return stop.requested
        # ranks agree on stopping every log_every steps (one tiny all-reduce), so they stop at the same step
        return self.global_step % self.cfg.log_every == 0 and self._stop_agreed(stop)

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether any rank got a stop signal (under DDP one tiny all-reduce): all ranks stop at the same point."""
        return self.dist.any(stop.requested, self.device)

    def _run_epoch(self, stop: StopFlag, progress: Any) -> bool:
        """One epoch (or its rest, after a mid-epoch resume); False when interrupted and saved."""
        self.recipe.train()
        self.recipe.epoch = self.epoch
        self._t0, self._seen = time.perf_counter(), 0
        start = self.loader.position
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=self.steps_per_epoch,
                                 completed=start, info="")
        self._last: dict[str, Any] | None = None
        try:
            for i, (x, y) in enumerate(self.loader, start=start):
                if i >= self.steps_per_epoch:
                    break
                self._last = self._step(x, y, self.epoch + i / self.steps_per_epoch) or self._last
                self._seen += len(y) * self.dist.world
                progress.update(task, advance=1)
                if self._last is not None and self.global_step % self.cfg.log_every == 0:
                    rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
                    progress.update(task, info=status_line(self.recipe.branch_names, self._last, rate))
                if i + 1 < self.steps_per_epoch and self._stop_requested(stop):
                    self._flush()
                    self.save(step_in_epoch=i + 1)
                    return False
        finally:
            progress.remove_task(task)  # the epoch's summary line replaces its bar
        self.loader.end_epoch()  # an epoch cut short by steps_per_epoch starts afresh next time
        return True

    def _end_epoch(self) -> None:
        self._last = self._flush() or self._last
        elapsed = time.perf_counter() - self._t0
        self.epoch += 1
        self.recipe.on_epoch_end()
        record: dict[str, Any] = {"type": "epoch", "epoch": self.epoch, "time_s": elapsed,
                                  "img_per_s": self._seen / max(elapsed, 1e-9)}
        if self._last is not None:
            record.update(loss=self._last["loss"], L=self._last["L"], w=self._last["w"])
        if temperatures := self.recipe.temperatures():  # B-MTARD's teacher temperatures, at the epoch's end
            record["T"] = temperatures
        if self.planner is not None:
            self._set_epochs(self.planner.on_epoch_end(self.epoch, self.cfg.epochs), "behind its budget")
        new_best = None
        if self.cfg.eval_every and (self.epoch % self.cfg.eval_every == 0 or self.epoch >= self.cfg.epochs):
            new_best = self._validate(record)
        if self.epoch >= self.cfg.epochs and self.best.get("score") is None:
            # no validation selected a model (eval_every=0, no validation split): best.pt holds the final raw weights,
            # so a finished run always has one
            self.best, new_best = {"epoch": self.epoch, "weights": "last"}, self.recipe.student
        self.history.append(record)
        self.log.write([record])
        if new_best is not None or self.epoch % self.cfg.checkpoint_every == 0 or self.epoch >= self.cfg.epochs:
            self.save()  # last.pt first, then best.pt: the pair never disagrees (see Checkpointer.best_is_stale)
        if new_best is not None:
            self._write_best(new_best)
        if self.is_main:
            self.console.log(epoch_line(record, self.recipe.branch_names))

    def _flush(self) -> dict[str, Any] | None:
        """One host sync: write the buffered per-step records, check for a non-finite loss."""
        if not self._records:
            return None
        steps, epochs, lrs, totals, losses, weights = zip(*self._records)
        totals_l = torch.stack(totals).tolist()
        losses_l = torch.stack(losses).tolist()
        weights_l = torch.stack(weights).tolist()
        self._records.clear()
        self.log.write([{"type": "step", "step": s, "epoch": e, "lr": lr, "loss": t, "L": li, "w": wi}
                        for s, e, lr, t, li, wi in zip(steps, epochs, lrs, totals_l, losses_l, weights_l)])
        if bool(self._bad):
            bad_at = next((s for s, t in zip(steps, totals_l) if not math.isfinite(t)), steps[-1])
            last = self.checkpoints.last
            kept = f"the last good checkpoint is {last}" if last is not None and last.is_file() else \
                "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad_at} (epoch {self.epoch + 1}); training stopped and "
                f"{kept}. Lower the learning rate, or train in fp32 / bf16 instead of fp16."
            )
        return {"loss": totals_l[-1], "L": losses_l[-1], "w": weights_l[-1]}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _adopt_epochs(self, epochs: int) -> None:
        """Train ``epochs`` (a budget's plan): a cosine follows them, a piecewise schedule's milestones move to
        the same shares of them (200 epochs decayed at 100, 150 planned as 20: at 10, 15)."""
        self.cfg.epochs = epochs
        full, milestones = self._configured_schedule
        if self.cfg.schedule == "piecewise" and milestones:
            self.cfg.milestones = scaled_milestones(milestones, full, epochs)

    def _set_epochs(self, epochs: int, why: str) -> None:
        """Adopt a budgeted epoch count; under DDP every rank takes rank 0's, so all stop together."""
        if self.dist.enabled:
            mine = torch.tensor([float(epochs if self.is_main else 0)], device=self.device)
            epochs = int(self.dist.sum(mine).item())
        if epochs == self.cfg.epochs:
            return
        self._adopt_epochs(epochs)
        if self.is_main:
            self.console.log(f"time budget {self.cfg.time_budget_s:.0f} s: {epochs} epochs ({why})")

    def _step(self, x: Tensor, y: Tensor, progress: float) -> dict[str, Any] | None:
        """One optimisation step at ``progress`` (fractional epochs, from the epoch and the step within it: a
        forced resume over another data size keeps the schedule on its epochs)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        factor = self.cfg.lr_factor(progress)
        set_lr([(opt, self.cfg.lr if base is None else base) for opt, base in self._lr_bases], factor)
        momentum = cycled_momentum(self.cfg, factor)
        if momentum is not None:  # the student's SGD only: a trainable teacher keeps its own optimizer's setting
            for g in self.optimizer.param_groups:
                g["momentum"] = momentum
        self.recipe.on_lr(factor)
        with autocast(self.precision, self.device):
            out = self.recipe(x, y, model=self.train_model)
        self._bad |= ~torch.isfinite(out.total)
        optimizers = [self.optimizer, *self.teacher_optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        self.dist.sync_grads(self._synced)
        self.scaler.step(self.optimizer)
        for opt in self.teacher_optimizers:  # a teacher whose own loss is off this step got no gradient: skipped
            if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                self.scaler.step(opt)
        self.scaler.update()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.recipe.student, step=self.global_step)
        if self.planner is not None:
            planned = self.planner.on_step(progress + 1 / self.steps_per_epoch)
            if planned is not None:
                self._set_epochs(planned, f"{self.planner.step_s * 1e3:.1f} ms/step measured")
        lr = self.cfg.lr * factor
        self._records.append((self.global_step, self.epoch + 1, lr, out.total.detach(), out.losses, out.weights))
        if self.global_step % self.cfg.log_every == 0:
            return self._flush()
        return None


def _make_ema(model: torch.nn.Module, decay: float | None) -> Any:
    """timm's ModelEmaV3 (parameters and buffers), its decay warmed up as 1 - (1 + step)^-3/4 up to ``decay``,
    so a short run averages over its last few hundred steps and a long one over ~1 / (1 - decay) steps."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)


__all__ = ["ConfigMismatchError", "NonFiniteLossError", "TrainResult", "Trainer"]
