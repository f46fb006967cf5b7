"""The ``multiteach`` command: train, eval, presets, config, plot.

Every error a user can cause (a bad config value, an unknown name, a missing file, a checkpoint of another
model, CUDA asked for where there is none) ends as one line naming the problem and the fix, with exit code
2; ``--debug`` shows the traceback instead. Exit codes: 0 done, 1 the run failed (non-finite loss),
2 bad input, 3 stopped by SIGINT/SIGTERM after writing a checkpoint (run the same command to resume),
4 an internal error (one line, and the file the traceback was written to). A full disk (or a file-size limit)
while writing is exit 2: checkpoints are written atomically, so the previous last.pt is kept.

Only argparse and rich are imported at module level: torch, timm and the rest of multiteach are imported inside
the commands, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from .signals import sigterm_interrupts

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_INTERNAL = 1, 2, 3, 4

console = Console(stderr=True)


class UsageError(ValueError):
    """Bad input found by the CLI itself."""


def _load_experiment(path: str, overrides: list[str]) -> Any:
    from .config import ExperimentConfig, apply_override, read_config

    d = read_config(path)
    for o in overrides:
        apply_override(d, o)
    return ExperimentConfig.model_validate(d)


def cmd_train(args: argparse.Namespace) -> int:
    from .build import build_trainer
    from .distributed import DistContext

    cfg = _load_experiment(args.config, args.set)
    dist = DistContext.from_env()  # torchrun sets WORLD_SIZE/RANK; a single process otherwise
    try:
        trainer = build_trainer(cfg, console=console, synthetic_data=args.synthetic, dist=dist)
        result = trainer.fit(resume=not args.restart, force=args.force)
    finally:
        dist.close()
    if result.status.startswith("interrupted"):
        console.print(f"stopped in epoch {result.epoch + 1} (after step {result.global_step}); checkpoint in "
                      f"{cfg.run_dir}/last.pt: run the same command again to resume")
        return EXIT_STOPPED
    if dist.is_main:
        _summary(cfg, result)
    return 0


def _summary(cfg: Any, result: Any) -> None:
    from rich.table import Table

    t = Table(title=f"{cfg.preset} ({cfg.student.model}) in {cfg.run_dir}")
    t.add_column("epoch", justify="right")
    for col in ("val clean %", f"val PGD-{cfg.train.eval_pgd_steps} %", "val W-Robust %", "img/s"):
        t.add_column(col, justify="right")
    for r in result.history[-5:]:
        t.add_row(str(r["epoch"]), *(f"{100 * r[k]:.2f}" if k in r else "-" for k in
                                     ("val_clean", "val_robust", "val_w_robust")), f"{r.get('img_per_s', 0):,.0f}")
    console.print(t)
    if result.best:
        console.print(f"best on validation: {result.best} -> {cfg.run_dir}/best.pt")


def _model_of(checkpoint: str, option: str = "--model") -> str | None:
    """The student's timm name recorded in a multiteach training checkpoint (None for a bare state_dict).

    The record is read as data, never trusted: a field of the wrong type (``experiment = "oops"``,
    ``model = 123``) is named in a one-line error that says to pass the name with ``option``."""
    from .checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("experiment") is None:
        return None
    node: Any = ckpt
    where = ""
    for key in ("experiment", "config", "student"):
        where = f"{where}.{key}" if where else key
        node = node.get(key)
        if node is None:
            return None
        if not isinstance(node, dict):
            raise CheckpointError(f"checkpoint {checkpoint!r} records {where} = {_short(node)}, not a table: "
                                  f"pass the model's timm name with {option} TIMM_NAME")
    model = node.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise CheckpointError(f"checkpoint {checkpoint!r} records {where}.model = {_short(model)}, not a timm "
                              f"model name: pass the name with {option} TIMM_NAME")
    return model


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def cmd_eval(args: argparse.Namespace) -> int:
    from .build import eval_tensors, load_splits
    from .config import DataConfig, EvalConfig, ModelConfig
    from .evaluation import AutoAttack, attacks_by_name, black_box_attacks, evaluate, slow_subsets
    from .runtime import resolve_device
    from .teachers import load_model

    ModelConfig(model=args.model or "unknown", checkpoint=args.checkpoint)  # checks the path
    model_name = args.model or _model_of(args.checkpoint)
    if model_name is None:
        raise UsageError(f"{args.checkpoint} records no model name: pass --model TIMM_NAME")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    if out.is_dir() or not out.parent.is_dir():  # checked before the attacks run, not after
        raise UsageError(f"--out {str(out)!r} cannot be written: give a file path in an existing folder")
    given = {"eps": args.eps, "n": args.n, "batch_size": args.batch_size, "attacks": args.attacks,
             "square_queries": args.queries, "tf32": args.tf32}
    planned = {k: v for k, v in _recorded(args.checkpoint, "eval").items() if k in given}
    ecfg = EvalConfig(**{**planned, **{k: v for k, v in given.items() if v is not None}})
    recorded = _recorded(args.checkpoint, "data")  # the data, resolution and augmentation it was trained with
    image_size = args.image_size or (recorded["image_size"] if isinstance(recorded.get("image_size"), int) else None)
    augment = recorded.get("augment") if recorded.get("augment") in ("crop_flip", "resized_crop", "none") else "auto"
    # the test split of the data it was trained on, unless told otherwise (a recorded folder only if it is here)
    dataset = args.dataset or recorded.get("dataset") or "cifar10"
    same = args.dataset is None or args.dataset == recorded.get("dataset")
    data_dir = args.data_dir or (recorded.get("data_dir") if same and not args.download and isinstance(
        recorded.get("data_dir"), str) and Path(recorded["data_dir"]).is_dir() else None)
    root = args.root or (recorded.get("root") if same and isinstance(recorded.get("root"), str) else None) or "data"
    data = DataConfig(data_dir=data_dir, download=args.download, root=root, dataset=dataset,
                      val_size=0, image_size=image_size, augment=augment, workers=args.workers)
    device = resolve_device(args.device)  # a device this machine lacks is refused before any work
    splits = load_splits(data, synthetic_data=args.synthetic)
    net = load_model(model_name, args.checkpoint, splits.num_classes).to(device)
    attacks: dict[str, Any] = attacks_by_name(ecfg.attacks, ecfg.eps)  # any registered attack, by name
    if args.autoattack:
        attacks["autoattack"] = AutoAttack(ecfg.eps)
    if args.black_box:
        surrogate = None
        if args.surrogate:
            s_name = args.surrogate_model or _model_of(args.surrogate, "--surrogate-model")
            if s_name is None:
                raise UsageError(f"{args.surrogate} records no model name: pass --surrogate-model TIMM_NAME")
            surrogate = load_model(s_name, args.surrogate, splits.num_classes).to(device)
        attacks.update(black_box_attacks(surrogate, ecfg.eps, ecfg.square_queries))
    x, y = eval_tensors(splits, ecfg.n, workers=args.workers)
    report = evaluate(net, x, y, attacks, batch_size=ecfg.batch_size, device=device,
                      subsets=slow_subsets(args.slow_n), tf32=ecfg.tf32, seed=args.seed,
                      on_row=lambda r: console.log(f"{r.attack}: robust {100 * r.robust:.2f}% ({r.seconds:.1f} s)"))
    report.meta.update(checkpoint=args.checkpoint, model=model_name, device=str(device),
                       data=data_dir or "torchvision", dataset=dataset, image_size=splits.image_size,
                       eps=ecfg.eps)
    Console().print(report.table(f"{model_name} from {args.checkpoint}"))
    report.save_json(out)
    console.log(f"wrote {out}")
    return 0


def _recorded(checkpoint: str, table: str) -> dict[str, Any]:
    """A table (``data``, ``eval``) of the config a multiteach training checkpoint records ({} when none)."""
    from .checkpoint import load_checkpoint

    node: Any = load_checkpoint(checkpoint)
    for key in ("experiment", "config", table):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def cmd_presets(args: argparse.Namespace) -> int:
    """One line per preset: name, teacher roles, official schedule, description (never wrapped, so the list
    reads and greps as one line each)."""
    from .presets import PRESETS

    def schedule(s: dict[str, Any]) -> str:
        if s.get("schedule", "piecewise") != "piecewise":
            hold = f" after {s['hold_fraction']:.0%}" if s.get("hold_fraction") else ""
            return f"{s.get('epochs', '?')} ep, {s['schedule']}{hold}"
        return f"{s.get('epochs', '?')} ep, x0.1 at {','.join(map(str, s.get('milestones', ()))) or '-'}"

    rows = [(name, ",".join(info.teachers) or "-", schedule(info.schedule), info.description)
            for name, info in sorted(PRESETS.items())]
    widths = [max(len(r[i]) for r in rows + [("preset", "teachers", "schedule", "")]) for i in range(3)]
    for r in [("preset", "teachers", "schedule", "description"), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


DEFAULT_TEACHERS = {"adv": "cifar_wrn34_10", "nat": "cifar_resnet56", "l2": "cifar_resnet18", "peer": "cifar_resnet18",
                    "t1": "cifar_wrn16_4", "t2": "cifar_resnet56", "t3": "cifar_mobilenetv2"}
FRESH_ROLES = {"peer"}  # teachers trained from scratch alongside the student (an online peer): no checkpoint


def preset_config(preset: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The full config of a preset with its official settings, as a dict (teachers' paths to fill in). The
    ``--set KEY=VALUE`` overrides go in first and the preset fills the rest, so ``train.epochs`` alone keeps its
    schedule's shape; the result is validated (a misspelt key is refused here, not when training starts)."""
    import copy

    from .config import ExperimentConfig, apply_override, planned_checkpoints
    from .presets import get_preset

    info = get_preset(preset)
    given: dict[str, Any] = {"preset": preset, "run_dir": f"runs/{preset}",
                             "teachers": {r: {"model": DEFAULT_TEACHERS.get(r, "cifar_resnet18"),
                                              "checkpoint": None if r in FRESH_ROLES else f"runs/{r}_teacher/best.pt"}
                                          for r in info.teachers}}
    for o in overrides:
        apply_override(given, o)
    checkable = copy.deepcopy(given)  # the teachers' files need not exist yet: train checks them
    for t in checkable.get("teachers", {}).values():
        if isinstance(t, dict):
            t["checkpoint"] = None
    base = planned_checkpoints(ExperimentConfig.model_validate(checkable),
                               {r: t.get("checkpoint") for r, t in given["teachers"].items()}).model_dump(mode="json")
    info.check_options(base["options"])
    base["options"] = {**{k: list(v) if isinstance(v, tuple) else v for k, v in info.options().items()
                          if v is not None}, **base["options"]}
    return base


def cmd_config(args: argparse.Namespace) -> int:
    from .config import to_toml

    d = preset_config(args.preset, args.set)
    head = f"# multiteach config for preset {args.preset!r}; run: multiteach train {args.output or 'THIS.toml'}\n"
    if d.get("teachers"):
        head += "# teachers' checkpoints must exist (train them with preset 'natural' / 'sat' / 'trades').\n"
    head += "# settings written '# key = ...  # unset' are off: remove the first '#' and give a value.\n"
    text = head + to_toml(d)
    if args.output:
        Path(args.output).write_text(text)
        console.log(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        from .plots import plot_run
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'multiteach[plot]'") from None
    for path in plot_run(args.run_dir, args.output):
        console.log(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multiteach", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers presets, weighters, attacks or datasets of your own); "
                        "repeatable; the current folder is on the import path")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a TOML/JSON config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.05")
    t.add_argument("--force", action="store_true", help="resume even if the config changed")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in run_dir")
    t.add_argument("--synthetic", action="store_true", help="toy images instead of CIFAR (smoke runs)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="the robustness table of a checkpoint on the test set")
    e.add_argument("checkpoint")
    e.add_argument("--model", help="timm name (default: the one the checkpoint records)")
    e.add_argument("--dataset",
                   help="a registered dataset: cifar10, cifar100, svhn, imagefolder (evaluated on DIR/val), npz, or a "
                        "--plugin's (default: the one the checkpoint was trained on, else cifar10)")
    e.add_argument("--data-dir", help="folder with train.npz/test.npz, or for imagefolder with train/<class>/* and "
                                      "val/<class>/* (default: the checkpoint's, if that folder is here)")
    e.add_argument("--download", action="store_true", help="download the dataset through torchvision")
    e.add_argument("--root", help="torchvision data folder (default: the checkpoint's, else 'data')")
    e.add_argument("--image-size", type=int, help="resolution in pixels (default: the one the checkpoint was trained "
                                                  "at, else the dataset's own; 224 for imagefolder)")
    e.add_argument("--workers", type=int, help="processes decoding image files (default: min(8, CPUs))")
    e.add_argument("--synthetic", action="store_true", help="toy images (smoke runs)")
    # the table's settings default to the [eval] table of the run that wrote the checkpoint, else EvalConfig's
    e.add_argument("--n", type=int, help="first n test images (default: the run's eval.n, else all)")
    e.add_argument("--eps", type=float, help="L-inf radius (default: the run's eval.eps, else 8/255)")
    e.add_argument("--attacks", nargs="+", help="rows by name (default: the run's eval.attacks, else fgsm pgd_sat "
                                                "pgd_trades cw_inf)")
    e.add_argument("--autoattack", action="store_true",
                   help="standard AutoAttack (pip install 'multiteach[autoattack]')")
    e.add_argument("--black-box", action="store_true", help="Square, and transfer attacks if --surrogate is given")
    e.add_argument("--surrogate", help="checkpoint of the transfer attacks' source model")
    e.add_argument("--surrogate-model", help="its timm name (default: recorded in it)")
    e.add_argument("--queries", type=int, help="Square's query budget (default: the run's, else 5000)")
    e.add_argument("--slow-n", type=int, help="AutoAttack and black-box rows on the first n images only")
    e.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size, else 256")
    e.add_argument("--tf32", action="store_true", default=None,
                   help="allow TF32 on Ampere and later GPUs (faster; the table says so); default: the run's "
                        "eval.tf32, else strict fp32")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="JSON report (default: CHECKPOINT.eval.json)")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("presets", help="list the presets")
    s.set_defaults(fn=cmd_presets)

    c = sub.add_parser("config", help="write a preset's full config as TOML")
    c.add_argument("preset")
    c.add_argument("-o", "--output")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(fn=cmd_config)

    g = sub.add_parser("plot", help="PNGs of L_i(t), w_i(t) and accuracy of a run directory")
    g.add_argument("run_dir")
    g.add_argument("-o", "--output", help="folder for the PNGs (default: the run directory)")
    g.set_defaults(fn=cmd_plot)
    return p


def _settings_at(title: str, loc: Sequence[Any]) -> list[str]:
    """The field names of the config table at ``loc`` under the model named ``title`` (for a misspelt key)."""
    import typing

    from pydantic import BaseModel

    from . import config

    model: Any = getattr(config, title, None)
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        if part not in model.model_fields:
            continue  # a dict key (a teacher's role): the value's model follows
        pending, model = [model.model_fields[part].annotation], None
        while pending:
            t = pending.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            pending.extend(typing.get_args(t))
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (the settings here: {', '.join(choices)})" if choices else ""


def one_line(e: BaseException) -> str:
    """An exception as one line: pydantic's errors as 'field: message' pairs."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or e.title
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden" and err["loc"]:
                msg = "unknown setting" + _did_you_mean(str(err["loc"][-1]), _settings_at(e.title, err["loc"][:-1]))
            got = "" if "input" not in err or isinstance(err["input"], dict) else f" (got {err['input']!r})"
            parts.append(f"{loc}: {msg}{got}")
        return "invalid configuration: " + "; ".join(parts)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno in _DISK_FULL:
        what = repr(str(e.filename)) if e.filename else "a file"
        return (f"writing {what} failed: {_DISK_FULL[e.errno]} ({e.strerror}): free space (or write elsewhere) "
                "and run the same command again; a training resumes from its last checkpoint")
    text = str(e).strip().splitlines()
    return " ".join(line.strip() for line in text) if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # --help and usage errors end here, before anything heavy is imported
    try:  # SIGTERM before training's own handler (start-up, eval) ends like SIGINT: exit 3, one line
        with sigterm_interrupts():
            _import_plugins(args.plugin)
            return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        console.print(STOPPED.get(args.command, STOPPED[None]), highlight=False, soft_wrap=True)
        return EXIT_STOPPED
    except Exception as e:
        if args.debug:
            raise
        code = exit_code(e)
        if code != EXIT_INTERNAL:
            console.print(f"[red]error:[/] {escape(one_line(e))}", highlight=False, soft_wrap=True)
            return code
        import tempfile  # a bug of ours: one line, the traceback kept in a file
        import traceback

        with tempfile.NamedTemporaryFile("w", prefix="multiteach-error-", suffix=".txt", delete=False) as f:
            traceback.print_exc(file=f)
        console.print(f"[red]internal error:[/] {escape(type(e).__name__)}: {escape(one_line(e))} (traceback in "
                      f"{f.name}; --debug shows it; please report it)", highlight=False, soft_wrap=True)
        return EXIT_INTERNAL


def _import_plugins(modules: list[str]) -> None:
    """Import each ``--plugin`` module (from the current folder or the installed packages)."""
    import importlib

    if modules and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    for m in modules:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m.split(".")[0] and e.name != m:
                raise
            raise UsageError(f"--plugin {m!r}: no such module (a file {m.replace('.', '/')}.py in this folder, or an "
                             "installed package)") from None


STOPPED = {
    "train": "stopped by a signal (a training saves its checkpoint first; the same command resumes)",
    "eval": "stopped by a signal during eval: no report was written; run the same command again",
    None: "stopped by a signal",
}


def exit_code(e: BaseException) -> int:
    """The exit code of an exception that ends a command: 1 a non-finite loss, 2 bad input or environment
    (pydantic's ValidationError, CheckpointError and ConfigMismatchError are ValueErrors; a full disk), 4 a bug.
    NonFiniteLossError is known by its class name, so this imports nothing (and survives the class moving)."""
    if any(c.__name__ == "NonFiniteLossError" for c in type(e).__mro__):
        return EXIT_FAILED
    if isinstance(e, ValueError | TypeError | FileNotFoundError | ImportError | KeyError):
        return EXIT_BAD_INPUT
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


_DISK_FULL = {getattr(errno, "EDQUOT", -1): "the disk quota is exhausted", errno.ENOSPC: "no space left on the disk",
              errno.EFBIG: "the file-size limit (ulimit -f) was reached"}


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["exit_code", "main", "one_line", "parser", "preset_config"]
