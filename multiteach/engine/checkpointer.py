"""Checkpoint files of a run directory: atomic last.pt / best.pt, the resume checks, the config diff, the
run-dir lock and the clean-up of temporary files a killed write left behind.

What goes into a checkpoint is the trainer's business (it owns the objects); this piece owns the files and
their consistency: last.pt is written before best.pt, and a best.pt older than the best epoch last.pt
records is rewritten on resume, so the pair never disagrees.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..checkpoint import CheckpointError, atomic_save, load_checkpoint, remove_stale_temps
from ..rundir import RunLock

FORMAT = 1


class ConfigMismatchError(ValueError):
    """Resuming a run whose checkpoint was written under another configuration."""


class Checkpointer:
    """last.pt and best.pt under ``run_dir`` (written by the main process only; ``run_dir=None``: nothing)."""

    def __init__(self, run_dir: Path | None, is_main: bool = True, console: Console | None = None) -> None:
        self.run_dir, self.is_main = run_dir, is_main
        self.console = console or Console(stderr=True)

    @property
    def last(self) -> Path | None:
        return self.run_dir / "last.pt" if self.run_dir is not None else None

    @property
    def best(self) -> Path | None:
        return self.run_dir / "best.pt" if self.run_dir is not None else None

    def lock(self) -> contextlib.AbstractContextManager:
        """Create the run directory and hold its lock (one training per run_dir; rank 0 holds it)."""
        if self.run_dir is None or not self.is_main:
            return contextlib.nullcontext()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"run_dir {str(self.run_dir)!r} cannot be used ({e.strerror}): choose another "
                             "folder") from None
        return RunLock(self.run_dir)

    def clean_temps(self) -> None:
        if self.run_dir is not None and self.is_main:
            for tmp in remove_stale_temps(self.run_dir):
                self.console.log(f"removed {tmp.name}, left by a process killed while writing a checkpoint")

    def save(self, state: dict[str, Any], name: str = "last.pt") -> Path | None:
        if self.run_dir is None or not self.is_main:
            return None
        return atomic_save({"format": FORMAT, **state}, self.run_dir / name)

    def load_last(self) -> dict[str, Any] | None:
        """last.pt if there is one, checked to be a multiteach training checkpoint. Read onto the CPU: RNG
        states must stay there, and every other state is copied to its module's device on loading."""
        path = self.last
        if path is None or not path.exists():
            return None
        if not path.is_file():
            raise CheckpointError(f"{path} is not a file: remove it (or use another run_dir) to start afresh")
        ckpt = load_checkpoint(path, map_location="cpu")
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a multiteach training checkpoint: remove it, or use another "
                                  "run_dir")
        return ckpt

    def check_compatible(self, ckpt: dict[str, Any], branches: list[str], experiment: dict[str, Any],
                         force: bool) -> None:
        """The checkpoint's recipe has these branches and (unless ``force``) its config is this one."""
        if ckpt.get("branches") != branches:
            raise ConfigMismatchError(f"{self.last} was written by a recipe with branches {ckpt.get('branches')}, "
                                      f"this one has {branches}: use another run_dir")
        old = ckpt.get("experiment") or {}
        if old.get("digest") != experiment.get("digest") and not force:
            diff = config_diff(old.get("config", {}), experiment.get("config", {}))
            raise ConfigMismatchError(
                f"{self.last} was written under another configuration ({'; '.join(diff[:4]) or 'different digest'}"
                "): resume with the original config, use a new run_dir, or force the resume (--force)"
            )

    def write_best(self, model: torch.nn.Module, best: dict[str, Any], experiment: dict[str, Any]) -> None:
        """best.pt from ``model`` (the student or its EMA); call after last.pt records it as the best."""
        if self.run_dir is None or not self.is_main:
            return
        metrics = {k: v for k, v in best.items() if k not in ("epoch", "score", "weights")}
        atomic_save({"student": model.state_dict(), "epoch": best["epoch"], "metrics": metrics,
                     "weights": best["weights"], "experiment": experiment}, self.best)

    def best_is_stale(self, ckpt: dict[str, Any], best: dict[str, Any]) -> bool:
        """A kill between last.pt and best.pt at the end of the best epoch left best.pt behind last.pt."""
        if self.best is None or not self.is_main or best.get("epoch") != ckpt["epoch"] or ckpt["step_in_epoch"]:
            return False
        try:
            current = load_checkpoint(self.best).get("epoch") if self.best.is_file() else None
        except CheckpointError:
            current = None
        return current != best["epoch"]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs, nested keys dotted."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


__all__ = ["Checkpointer", "ConfigMismatchError", "config_diff"]
