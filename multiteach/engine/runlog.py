"""The run log: metrics.jsonl (one JSON record per line, kept in step with the checkpoint), TensorBoard, the
progress bar and the one-line epoch summaries."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

WIDE = 120  # columns from which the progress bar also shows the latest losses and weights


class RunLog:
    """``metrics.jsonl`` under ``run_dir`` (main process only): step records ``{type: "step", step, epoch, lr,
    loss, L, w}`` and epoch records ``{type: "epoch", epoch, time_s, img_per_s, val_*}`` (and ``T``, the
    teachers' temperatures by branch, where a balance moves them); optionally the same
    scalars in TensorBoard under ``run_dir/tb``."""

    def __init__(self, run_dir: Path | None, branch_names: list[str], *, enabled: bool = True,
                 tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and enabled else None
        self.names = branch_names
        self.tensorboard = tensorboard and self.path is not None
        self._writer: Any = None

    def open(self) -> None:
        if not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard = true needs the tensorboard package: "
                             "pip install 'multiteach[tensorboard]'") from None
        self._writer = SummaryWriter(str(self.path.parent / "tb"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def clear(self) -> None:
        """A fresh start (or ``--restart``) starts a fresh log."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append records, each line in one write and flushed, so a kill tears at most the last line."""
        if self.path is None or not records:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(_rounded(r)) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        if self._writer is not None:
            for r in records:
                self._to_tensorboard(r)

    def _to_tensorboard(self, r: dict[str, Any]) -> None:
        if r["type"] == "step":
            self._writer.add_scalar("loss/total", r["loss"], r["step"])
            for name, li, wi in zip(self.names, r["L"], r["w"]):
                self._writer.add_scalar(f"loss/{name}", li, r["step"])
                self._writer.add_scalar(f"weight/{name}", wi, r["step"])
        else:
            for k, v in r.items():
                if isinstance(v, float):
                    self._writer.add_scalar(f"epoch/{k}", v, r["epoch"])
            for name, t in r.get("T", {}).items():
                self._writer.add_scalar(f"temperature/{name}", t, r["epoch"])

    def truncate(self, global_step: int, epoch: int) -> None:
        """After a resume, keep each record up to the checkpoint once; a torn line is dropped with a warning."""
        if self.path is None or not self.path.is_file():
            return
        keep, seen = [], set()
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-write: the checkpoint does not include it anyway
                warnings.warn(f"{self.path}: dropped unreadable line {n} ({line[:40]!r})", stacklevel=2)
                continue
            key = (r.get("type"), r.get("step") if r.get("type") == "step" else r.get("epoch"))
            inside = (r.get("type") == "step" and r["step"] <= global_step) or \
                     (r.get("type") == "epoch" and r["epoch"] <= epoch)
            if inside and key not in seen:
                seen.add(key)
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))


def _rounded(r: dict[str, Any]) -> dict[str, Any]:
    """Floats to 7 significant digits: the log reads 0.0142798, not 0.014279805999649398."""
    def rnd(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.7g}")
        if isinstance(v, list):
            return [rnd(x) for x in v]
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return v
    return {k: rnd(v) for k, v in r.items()}


def progress_bar(console: Console, enabled: bool) -> Progress:
    """One bar for the running epoch (removed when it ends: the epoch's summary line replaces it). The losses
    and weights ride along on the bar only where the terminal is wide enough not to squeeze it."""
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=None if console.width >= WIDE
                                                                             else 24),
                          MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if console.width >= WIDE:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=not enabled, transient=True)


def epoch_line(r: dict[str, Any], names: list[str]) -> str:
    parts = [f"epoch {r['epoch']}", f"{r['time_s']:.1f}s", f"{r['img_per_s']:,.0f} img/s"]
    if "L" in r:
        parts += [f"L_{n}={li:.4f} w_{n}={wi:.3f}" for n, li, wi in zip(names, r["L"], r["w"])]
    if "T" in r:
        parts.append(" ".join(f"T_{n}={t:.2f}" for n, t in r["T"].items()))
    if "val_clean" in r:
        robust = f" robust {100 * r['val_robust']:.2f}" if "val_robust" in r else ""
        parts.append(f"val clean {100 * r['val_clean']:.2f}{robust}")
    if "val_ema_clean" in r:
        robust = f" / {100 * r['val_ema_robust']:.2f}" if "val_ema_robust" in r else ""
        parts.append(f"EMA {100 * r['val_ema_clean']:.2f}{robust}")
    return " | ".join(parts)


def status_line(names: list[str], last: dict[str, Any] | None, rate: float) -> str:
    last = last or {"L": [], "w": []}
    parts = [f"L_{n}={li:.4f} w_{n}={wi:.3f}" for n, li, wi in zip(names, last["L"], last["w"])]
    return " ".join(parts) + f" {rate:,.0f} img/s"


__all__ = ["RunLog", "epoch_line", "progress_bar", "status_line"]
