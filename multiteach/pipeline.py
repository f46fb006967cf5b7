"""Multi-stage runs (teachers, then students): a stage cache keyed by recipe and seed, and the final table.

A teacher is trained once: ``train_cached`` files each finished run under ``cache_dir/<preset>-<model>-seed<s>-
<digest>``, the digest hashing everything that shapes training (preset and options, model, data, schedule,
seed, a budgeted stage's share of its budget), and returns its ``best.pt`` without training when that entry is
complete. An unfinished entry resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from .build import Splits, build_trainer, eval_tensors
from .checkpoint import atomic_write_json
from .config import ExperimentConfig, ModelConfig, digested
from .distributed import DistContext
from .engine.checkpointer import ConfigMismatchError, config_diff
from .evaluation import Report, evaluate
from .signals import sigterm_interrupts

DONE = "done.json"


class StageStopped(RuntimeError):
    """A stage was interrupted (SIGINT/SIGTERM) after writing its checkpoint."""


T = TypeVar("T")


def run_command(main: Callable[[], T], console: Console | None = None) -> T:
    """An example's ``main`` as a command, ending as the ``multiteach`` CLI does: SIGTERM (a scheduler's or
    ``timeout``'s) stops it as Ctrl-C does, and a stop ends in one line and exit code 3 (what finished is kept:
    checkpoints, cached stages, so the same command goes on); bad input or environment (a missing file, an
    invalid setting) in one line and exit code 2; a bug of ours with its traceback."""
    from rich.markup import escape

    from .cli import EXIT_INTERNAL, EXIT_STOPPED, exit_code, one_line

    out = console or Console(stderr=True)
    try:
        with sigterm_interrupts():
            return main()
    except (StageStopped, KeyboardInterrupt) as e:
        why = str(e) if isinstance(e, StageStopped) else "stopped by a signal; run the same command again to resume"
        out.print(f"[bold]stopped[/]: {escape(why)}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_STOPPED) from None
    except Exception as e:
        code = exit_code(e)
        if code == EXIT_INTERNAL:
            raise
        out.print(f"[red]error:[/] {escape(one_line(e))}", highlight=False, soft_wrap=True)
        raise SystemExit(code) from None


def cache_entry(cfg: ExperimentConfig, cache_dir: str | Path) -> Path:
    """The cache folder of a run: the same recipe, model, data, schedule and seed give the same folder."""
    return Path(cache_dir) / f"{cfg.preset}-{cfg.student.model}-seed{cfg.train.seed}-{cfg.digest()}"


def read_done(run_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished stage (``run_dir/done.json``: its best epoch, epochs, digest, budgets), or None
    when the stage has not finished. An unreadable record is a ValueError naming the file and the fix."""
    done = Path(run_dir) / DONE
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = "it is empty" if isinstance(e, json.JSONDecodeError) and not e.doc.strip() else str(e)
        raise ValueError(f"{done} cannot be read ({why}): delete it and run again (the stage resumes from its "
                         "last.pt, if any, and writes done.json anew)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{done} holds no record of a finished stage: delete it and run again (the stage resumes "
                         "from its last.pt, if any, and writes done.json anew)")
    return record


def train_stage(cfg: ExperimentConfig, splits: Splits | None = None, *, console: Console | None = None,
                dist: DistContext | None = None) -> Path:
    """Train (or resume, or skip if finished) the run ``cfg.run_dir``; returns its best.pt (selected on
    validation; without validation, the final weights)."""
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg)
    finished = read_done(run_dir)
    if finished is not None:
        if console is not None:
            console.log(f"{run_dir}: finished earlier ({finished.get('best')}), skipped")
        return run_dir / "best.pt"
    t0 = time.perf_counter()
    result = build_trainer(cfg, console=console, splits=splits, dist=dist).fit(resume=True)
    if result.status != "finished":
        raise StageStopped(f"{run_dir}: {result.status}; run the same command again to resume")
    if dist is None or dist.is_main:
        atomic_write_json({"best": result.best, "epochs": result.epoch, "digest": cfg.digest(),
                           "stage_budget_s": cfg.train.stage_budget_s, "time_budget_s": cfg.train.time_budget_s,
                           "seconds_this_call": time.perf_counter() - t0}, run_dir / DONE)
    if console is not None:
        best = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.best.items()}
        console.log(f"[bold]{run_dir}[/]: {result.epoch} epochs, best.pt {best} "
                    f"({time.perf_counter() - t0:.0f} s this call)")
    return run_dir / "best.pt"


def check_run_dir(cfg: ExperimentConfig) -> None:
    """Refuse a run folder that holds a finished or stopped run of another configuration (naming the first
    settings that differ), so a pipeline can check its last stage's folder before its first stage trains."""
    run_dir = Path(cfg.run_dir)
    last = run_dir / "last.pt"
    finished = read_done(run_dir)
    if finished is not None:
        digest, what, recorded = finished.get("digest"), "finished", run_dir / "best.pt"
        if digest == cfg.digest() and cfg.train.stage_budget_s is None:
            _refuse_unnamed_budget(finished, recorded, cfg)
    elif last.is_file():  # (a damaged one: the trainer's resume says what is wrong with it)
        digest, what, recorded = _recorded(last).get("digest"), "stopped", last
    else:
        return
    if digest is not None and digest != cfg.digest():  # files written before digests: not checked
        raise ConfigMismatchError(f"{run_dir} holds a {what} run of another configuration ("
                                  f"{_differences(recorded, cfg)}): use another run directory, or remove that one "
                                  "to train this configuration")


def _refuse_unnamed_budget(finished: dict[str, Any], best: Path, cfg: ExperimentConfig) -> None:
    """The digest leaves out ``time_budget_s`` (the time left when a stage starts): a run finished under a time
    budget that no ``stage_budget_s`` names has the digest of the unbudgeted run. Refused, not reused, where one
    of the two is budgeted and the other not (a teacher of a 75-s smoke run is not the 30-epoch one asked for)."""
    if "time_budget_s" in finished:
        budget = finished["time_budget_s"]
    else:  # done.json written before it recorded budgets: best.pt's config says
        budget = _recorded(best).get("config", {}).get("train", {}).get("time_budget_s")
    asked = cfg.train.time_budget_s
    if (budget is None) == (asked is None):
        return
    held = f"a run trained under a {budget:.0f}-s time budget" if budget is not None else "an unbudgeted run"
    wanted = f"a {asked:.0f}-s time budget" if asked is not None else "no time budget"
    raise ConfigMismatchError(f"{best.parent} holds {held}, and this configuration asks for {wanted} without "
                              "naming its stage: set stage_budget_s to name a budgeted stage, or remove that folder "
                              "(or use another) to train this configuration")


def _differences(recorded: Path, cfg: ExperimentConfig) -> str:
    """The first settings in which the run's recorded config (its best.pt or last.pt) differs from ``cfg``."""
    old = _recorded(recorded).get("config")
    if old is None:
        return "different digest"
    return "; ".join(config_diff(digested(old), digested(cfg.model_dump(mode="json")))[:4]) or "different digest"


def _recorded(checkpoint: Path) -> dict[str, Any]:
    """The ``experiment`` (digest, config) a run's checkpoint records; {} for a damaged or missing file."""
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(checkpoint, map_location="cpu").get("experiment") or {}
    except Exception:
        return {}


def train_cached(cfg: ExperimentConfig, cache_dir: str | Path, splits: Splits | None = None, **kwargs: Any) -> Path:
    """``train_stage`` in the cache entry of ``cfg`` (its own ``run_dir`` is ignored)."""
    entry = cache_entry(cfg, cache_dir)
    return train_stage(cfg.model_copy(update={"run_dir": str(entry)}), splits, **kwargs)


def evaluate_checkpoint(model_name: str, checkpoint: str | Path, splits: Splits, attacks: dict[str, Any],
                        device: str, n: int | None = None, subsets: dict[str, int] | None = None,
                        tf32: bool = False, seed: int | None = None) -> Report:
    """The robustness table of a checkpoint on the first ``n`` test images (fp32, ``tf32`` allowed or not; eval
    mode; ``seed``: each row's random starts from its own stream)."""
    from .teachers import load_model

    net = load_model(model_name, checkpoint, splits.num_classes)
    x, y = eval_tensors(splits, n)
    report = evaluate(net.to(device), x, y, attacks, device=device, subsets=subsets, tf32=tf32, seed=seed)
    report.meta.update(model=model_name, checkpoint=str(checkpoint))
    return report




def stage_config(preset: str, model: str | ModelConfig, data: Any, run_dir: str | Path, *,
                 options: dict | None = None,
                 teachers: dict[str, tuple[str, str | Path | None] | ModelConfig] | None = None,
                 **train: Any) -> ExperimentConfig:
    """An ``ExperimentConfig`` for one stage: ``model`` a timm name or a model table (pretrained weights,
    resize, ...); ``teachers`` maps a role to (timm name, checkpoint or None: a fresh network, e.g. an online
    peer) or to a model table. Epochs and milestones not given are the preset's official ones."""
    def table(m: Any) -> Any:
        if isinstance(m, ModelConfig):
            return m
        name, ckpt = m
        return {"model": name, "checkpoint": None if ckpt is None else str(ckpt)}

    return ExperimentConfig(
        preset=preset, options=options or {}, student=model if isinstance(model, ModelConfig) else {"model": model},
        data=data, train=train, teachers={role: table(m) for role, m in (teachers or {}).items()},
        run_dir=str(run_dir),
    )


__all__ = ["StageStopped", "cache_entry", "check_run_dir", "evaluate_checkpoint", "read_done", "run_command",
           "stage_config", "train_cached", "train_stage"]
