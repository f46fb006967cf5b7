"""Reference run: MTARD on CIFAR-10, from nothing to the robustness table.

    python examples/mtard_cifar.py --data-dir /path/with/train.npz          # numpy files (x uint8 NHWC, y)
    python examples/mtard_cifar.py --download                               # torchvision's CIFAR-10
    python examples/mtard_cifar.py --adv-teacher adv.pt --nat-teacher nat.pt --data-dir ...
    python examples/mtard_cifar.py --tiny --data-dir ...                    # CPU smoke run, a minute or two
    python examples/mtard_cifar.py --plan speedrun --budget 540 --data-dir ...  # everything in 9 minutes
    python examples/mtard_cifar.py --plan paper --data-dir ...              # the paper's protocol (hours)

Stages: natural teacher -> adversarial teacher -> student (MTARD by default, --preset picks another) ->
evaluation table and plots. Teachers are trained once into a cache keyed by recipe and seed (--teacher-cache;
and budget share, under --budget) and reused by any later run; every stage resumes if interrupted and is
skipped once finished, so the pipeline can run as several shorter commands. Every model is selected on a
held-out validation split, never on the test set.

``--budget SECONDS`` makes the whole run end, table printed, within that wall time: each stage gets its share
of the time still left (a stage that ran long shortens the next), picks its epochs from the throughput of its
first steps, and the evaluation runs its rows in priority order (the student's, the adversarial teacher's
PGD_SAT, AutoAttack on the first images, the teacher's other rows) while time remains. ``--wall SECONDS`` fits
a student and its table into fewer seconds than the budget (a call with less time left), from the teachers a
full-budget command cached (found under the budget's names; never trained short under them).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from multiteach.budget import TimeBudget
from multiteach.build import build_recipe, eval_tensors, load_splits
from multiteach.checkpoint import atomic_write_json
from multiteach.config import DataConfig, ExperimentConfig, apply_override, planned_checkpoints
from multiteach.distributed import DistContext
from multiteach.evaluation import (
    AutoAttack,
    Report,
    TimedEvaluation,
    black_box_attacks,
    precision_label,
    slow_subsets,
    standard_attacks,
)
from multiteach.models import natural_recipe
from multiteach.pipeline import (
    StageStopped,
    cache_entry,
    check_run_dir,
    evaluate_checkpoint,
    read_done,
    run_command,
    stage_config,
    train_cached,
    train_stage,
)
from multiteach.presets import get_preset
from multiteach.teachers import check_model_name, load_model

console = Console(stderr=True)

# FULL: the H100 plan (see benchmarks/RESULTS.md for what it reached); TINY: a CPU smoke run.
FULL = {
    "nat": dict(model="cifar_resnet18", preset="natural", epochs=20, options={}),
    "adv": dict(model="cifar_resnet18", preset="sat", epochs=30,
                options={"steps": 5, "alpha": 4 / 255, "bn_mode": "eval"}),
    "l2": dict(model="cifar_resnet18", preset="sat", epochs=20,
               options={"steps": 5, "norm": "L2", "eps": 0.5, "alpha": 0.125, "bn_mode": "eval"}),
    "student": dict(model="cifar_resnet18", epochs=40, options={}),
    "train": dict(batch_size=256, lr=0.2, warmup_epochs=1.0, schedule="cosine", milestones=[]),
    "val_size": 1000, "train_size": None, "eval_n": None,
}
TINY = {
    "nat": dict(model="cifar_resnet8", preset="natural", epochs=4, options={}),
    "adv": dict(model="cifar_resnet8", preset="sat", epochs=2, options={"steps": 3, "bn_mode": "eval"}),
    "l2": dict(model="cifar_resnet8", preset="sat", epochs=2,
               options={"steps": 3, "norm": "L2", "eps": 0.5, "alpha": 0.25, "bn_mode": "eval"}),
    "student": dict(model="cifar_resnet8", epochs=3, options={"steps": 3}),
    "train": dict(batch_size=32, lr=0.05, schedule="cosine", milestones=[], eval_pgd_steps=5),
    "val_size": 200, "train_size": 1200, "eval_n": 200,
    "budget": {"shares": {"nat": 0.2, "adv": 0.3, "student": 0.5}, "eval_reserve_s": 20, "autoattack_n": 40,
               "exit_margin_s": 2},
}
# The SAT teachers attack the eval-mode student (bn_mode "eval"), as every recorded run did; the preset's default
# is Madry's train mode. A 5-step attack takes Madry's step rule, 2.5 eps / 5 = 4/255, from a uniform start (the
# plain PGD-AT script of RECIPES.md): with 2/255 steps a uniform start leaves pixels short of the boundary, a
# weaker attack than the official PGD-10's (benchmarks/attack_strength.py, RESULTS.md); 4/255 matches it. (The
# speedrun's SAT teacher takes 2/255 steps all the same: measured, below.)
# SPEEDRUN: the one-command reference on one H100 (`--budget 540`); epochs come from the budget (at most these). The
# natural teacher is airbench94's network with its own start and recipe (cifar_airbench94, natural_recipe: batch
# 1,024): H200 run 6 (RESULTS.md) trained it to 89.84% clean in its 30 s (59 epochs, ~146,000 img/s) where ResNet-18
# reached 86.51 in run 4's 28 s; the MTARD student gained 0.55 W-Robust (61.78 against 61.23) and ended 0.55 under
# its own adversarial teacher, not 1.56. ResNet-18's batch 512 / lr 0.4 (its step is launch-bound: 2x img/s at 512)
# stays for --nat-arch cifar_resnet18. Batch 256 / lr 0.2 for the attack stages (run B: more steps beat the ~10% more
# img/s of batch 512). The SAT teacher's PGD-5 takes 2/255 steps from a uniform start, the student's 4/255: the
# teachers of runs 4 and 6 (and the students of runs 5 and 7 from them) ran so; with 4/255 for the teacher too (run
# 2) it was 2.2 points less accurate, 1.8 more robust, the same W-Robust, its student no better. KL averaged per
# sample (batchmean), so a short run is not trained at a tenth of the step the official 1/C scale gives; EMA of the
# weights, selected against the raw ones. The evaluation reserve holds both models' rows (~45 s on an H200) and
# AutoAttack on 1,000 images in one call: runs 1, 2 and 4 fit ~44 s a call plus ~42 ms an image (85 s for 1,000 in
# run 2), the fixed part ~6,900 single-image passes at the latency run 6 measured (6.6 ms); else the most images that
# fit, in twentieths, as one call. The teacher's rows run before the student's AutoAttack: a call cut at the budget
# then costs AutoAttack's images, not the teacher's row (run 6 lost it so). Without AutoAttack (--no-autoattack: a
# lever's call) the student keeps back 35 s, not 160: its own rows, the natural teacher's clean accuracy and the
# teacher's PGD_SAT (~30 s on the H200 in run 2); the teacher's other rows run if time is left.
# On one H100 (run 8) these defaults ran in 510 s, the table complete but the teacher's AutoAttack (23 s left, a
# call takes ~90 s); the student's AutoAttack covered its 1,000 images in one call, 89.5 s against 99.3 predicted.
# The table runs with TF32 allowed (cuDNN's default, as run 1 did without saying so): in strict fp32 the
# rows and AutoAttack's arithmetic take longer than the reserve holds. One check row, the student's PGD_SAT on
# the first 1,000 images in strict fp32, shows what TF32 changes; the table's title says which.
# The budget's shares are the split H200 run 2 spent (29 s, 111 s, 201 s of its stages' 341 s): 0.10 / 0.36 / 0.54
# were planned, but the teachers' plans were cut by their first validation's one-off cost and their unused seconds
# went to the student. With that fixed, these shares keep run 2's measured split instead of moving ~20 s from the
# student to the teachers untested.
SPEEDRUN = {
    "nat": dict(model="cifar_airbench94", preset="natural", epochs=60, options={},
                train=dict(batch_size=512, lr=0.4)),  # ResNet-18's (cifar_airbench94 trains with its own recipe)
    "adv": dict(model="cifar_resnet18", preset="sat", epochs=80,
                options={"steps": 5, "alpha": 2 / 255, "bn_mode": "eval"}),
    "l2": dict(model="cifar_resnet18", preset="sat", epochs=80,
               options={"steps": 5, "norm": "L2", "eps": 0.5, "alpha": 0.125, "bn_mode": "eval"}),
    "student": dict(model="cifar_resnet18", epochs=120,
                    options={"steps": 5, "alpha": 4 / 255, "reduction": "batchmean", "start": "uniform"}),
    "train": dict(batch_size=256, lr=0.2, warmup_epochs=1.0, schedule="cosine", milestones=[], weight_decay=5e-4,
                  ema_decay=0.999, eval_every=4, eval_pgd_steps=10, checkpoint_every=5),
    "val_size": 1000, "train_size": None, "eval_n": None,
    "budget": {"shares": {"nat": 0.085, "adv": 0.325, "student": 0.59}, "eval_reserve_s": 160, "autoattack_n": 1000,
               "lean_reserve_s": 35, "exit_margin_s": 8},
    "eval_tf32": True,
}
# CPU: the speedrun's recipe scaled to a 2-core CPU (ResNet-8, 10,000 training images, 15 / 10 / 10 epochs; on 2
# cores ~13 minutes for the teachers, ~12 per student with its table): for comparing levers where no GPU is at
# hand. Its figures rank options; the levels are a small net's, far below the speedrun's.
CPU = {
    "nat": dict(model="cifar_resnet8", preset="natural", epochs=15, options={}),
    "adv": dict(model="cifar_resnet8", preset="sat", epochs=10,
                options={"steps": 5, "alpha": 4 / 255, "bn_mode": "eval"}),
    "l2": dict(model="cifar_resnet8", preset="sat", epochs=10,
               options={"steps": 5, "norm": "L2", "eps": 0.5, "alpha": 0.125, "bn_mode": "eval"}),
    "student": dict(model="cifar_resnet8", epochs=10, options=SPEEDRUN["student"]["options"]),
    "train": dict(batch_size=128, lr=0.1, warmup_epochs=1.0, schedule="cosine", milestones=[], weight_decay=5e-4,
                  ema_decay=0.999, eval_every=2, eval_pgd_steps=10),
    "val_size": 500, "train_size": 10000, "eval_n": 1000,
}
# PAPER: the MTARD paper's protocol on CIFAR-10, for users with the time (hours on one GPU): a ResNet-56 natural
# teacher and a TRADES WRN-34-10 adversarial teacher (the paper loads RobustBench's Zhang2019Theoretically;
# --adv-teacher gives one), the ResNet-18 student with every MTARD setting as published (PGD-10 from
# x + 0.001 N, KL averaged over batch x classes, ANL beta 1 / r_w 0.025, 300 epochs, x0.1 at 215, 260, 285);
# each stage its preset's official schedule and settings (where a preset registers none: batch 128, SGD lr 0.1,
# TrainConfig's defaults). No EMA, no time budget.
PAPER = {
    "nat": dict(model="cifar_resnet56", preset="natural", epochs=None, options={}),
    "adv": dict(model="cifar_wrn34_10", preset="trades", epochs=None, options={}),
    "l2": dict(model="cifar_resnet18", preset="sat", epochs=None, options={"norm": "L2", "eps": 0.5, "alpha": 0.1}),
    "student": dict(model="cifar_resnet18", epochs=None, options={}),
    "train": {},
    "val_size": 1000, "train_size": None, "eval_n": None,
}
PLANS = {"full": FULL, "tiny": TINY, "speedrun": SPEEDRUN, "paper": PAPER, "cpu": CPU}
DEFAULT_BUDGET = {"shares": {"nat": 0.15, "adv": 0.35, "student": 0.5}, "eval_reserve_s": 240, "autoattack_n": 1000,
                  "exit_margin_s": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options every pipeline example shares."""
    p.add_argument("--data-dir", help="folder with train.npz / test.npz")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 through torchvision")
    p.add_argument("--root", default="data", help="torchvision data folder")
    p.add_argument("--run-dir", default="runs/mtard_cifar", help="where the student runs go (one folder each)")
    p.add_argument("--teacher-cache", help="teachers trained once, reused by recipe and seed (default: "
                                           "a 'teachers' folder beside --run-dir)")
    p.add_argument("--student", help="student timm name (default cifar_resnet18)")
    p.add_argument("--epochs", type=int, help="student epochs (with --budget: the most it trains)")
    p.add_argument("--nat-epochs", type=int, help="natural teacher epochs")
    p.add_argument("--adv-epochs", type=int, help="adversarial teacher epochs")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a small slice, tiny models (= --plan tiny)")
    p.add_argument("--plan", choices=sorted(PLANS), help="full (default: ResNet-18 teachers, 20/30/40 epochs), "
                   "paper (the paper's protocol: hours), speedrun (for --budget), cpu (levers on a CPU) or tiny")
    p.add_argument("--budget", type=float, help="wall-clock seconds for the whole run, table included")
    p.add_argument("--share", action="append", default=[], metavar="ROLE=WEIGHT",
                   help="a stage's weight in the budget's split, over the plan's (roles nat, adv, student; "
                        "speedrun: 0.085, 0.325, 0.59), e.g. adv=0.45; repeatable")
    p.add_argument("--student-seconds", type=student_seconds, metavar="SECONDS",
                   help="the student stage's seconds at most, epochs planned from its measured rate (with --budget: "
                        "or the time left before the evaluation's reserve, if less): a lever with another step cost "
                        "compared at the reference student's time (its allotted seconds; like:mtard reads them from "
                        "the newest mtard run in --run-dir, like:FOLDER from that run)")
    p.add_argument("--started-at", type=float,
                   help="Unix time the budget counts from (default: now; benchmarks/reference.sh passes its start)")
    p.add_argument("--wall", type=float, metavar="SECONDS",
                   help="with --budget: the most seconds this command may take from --started-at, where that is less "
                        "than the budget (a device call's or a scheduler's limit): the student and the evaluation fit "
                        "it; the teachers, found under the budget's cache names, must be cached already")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student stage (about a minute of compilation, ~1.3x faster steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, help="evaluate on the first n test images (default: all)")
    p.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=False,
                   help="add standard AutoAttack to the table (--no-autoattack after it: a lever's call on "
                        "benchmarks/reference.sh, which passes --autoattack, spends no time on it)")
    p.add_argument("--eval-tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="the reference table with TF32 allowed (and one strict-fp32 check row); default: the "
                        "plan's (speedrun: on)")
    p.add_argument("--black-box", action="store_true", help="add transfer (from the adversarial teacher) and Square")
    p.add_argument("--slow-n", type=int, help="run AutoAttack and the black-box rows on the first n images only "
                                              "(default: all; under --budget, the plan's first 1,000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def given_options(flag: str, pairs: list[str], preset: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of a command-line flag as options of ``preset`` (values read as TOML, as
    ``multiteach --set``), each checked to be one of its options."""
    given: dict[str, Any] = {}
    for pair in pairs:
        try:
            apply_override(given, pair)
        except ValueError:
            raise ValueError(f"{flag} {pair!r}: write KEY=VALUE, e.g. steps=7") from None
    try:
        get_preset(preset).check_options(given)
    except ValueError as e:
        raise ValueError(f"{flag} {e}") from None
    return given


def student_folder(preset: str, pairs: list[str]) -> str:
    """The run folder of a student given ``--option`` pairs: ``mtard``, or ``mtard-reduction=mean-beta=2``, so a
    student with other options trains in its own folder instead of meeting another's finished run."""
    return "-".join([preset, *(re.sub(r"[^\w=.+-]", "_", pair) for pair in pairs)])


def student_seconds(value: str) -> float | str:
    """--student-seconds: seconds (> 0), or ``like:RUN``, resolved by :func:`allotted_student_seconds`."""
    if value.startswith("like:") and value[5:]:
        return value
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"give seconds (> 0) or like:RUN (a run folder or a preset), got {value!r}")
    return seconds


def allotted_student_seconds(like: str, run_dir: Path) -> tuple[float, Path]:
    """The seconds a finished budgeted run allotted its student (its eval.json), and that file: a lever's
    student timed like that reference's, without reading the number off its log. ``like`` is the run's folder,
    its eval.json, or a preset: the newest run in ``run_dir`` of that preset without --option (its folder
    ``mtard``, or ``mtard-1a2b3c4d`` under --folder-by-config)."""
    path = Path(like)
    if path.suffix == ".json":
        found = [path]
    elif path.is_dir():
        found = [path / "eval.json"]
    else:
        found = [f / "eval.json" for f in (run_dir.iterdir() if run_dir.is_dir() else [])
                 if f.name == like or re.fullmatch(re.escape(like) + r"-[0-9a-f]{8}", f.name)]
    found = [f for f in found if f.is_file()]
    if not found:
        raise ValueError(f"--student-seconds like:{like}: no evaluated run found (a folder with eval.json, or a "
                         f"preset's run in {run_dir}); run that reference first, or give the seconds")
    source = max(found, key=lambda f: f.stat().st_mtime)
    stages = json.loads(source.read_text()).get("budget", {}).get("stages", {})
    seconds = stages.get("student", {}).get("allotted_s")
    if not seconds or not seconds > 0:
        raise ValueError(f"--student-seconds like:{like}: {source} records no budgeted student stage (a run "
                         "under --budget does); give the seconds instead")
    return float(seconds), source


def budget_shares(plan_shares: dict[str, float], pairs: list[str]) -> dict[str, float]:
    """The plan's stage weights with ``--share ROLE=WEIGHT`` pairs over them (weights are relative)."""
    shares = dict(plan_shares)
    for pair in pairs:
        role, _, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if role not in shares or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--share {pair!r}: write ROLE=WEIGHT with ROLE one of {', '.join(shares)} and a "
                             "positive weight (relative to the others), e.g. adv=0.4")
        shares[role] = weight
    return shares


class Pipeline:
    """Teachers (cached), one student, its table: what the examples and benchmarks/table2.py share."""

    def __init__(self, args: argparse.Namespace, dist: DistContext | None = None) -> None:
        if not args.data_dir and not args.download:
            raise ValueError("give --data-dir (train.npz/test.npz) or --download (torchvision)")
        self.args, self.dist = args, dist or DistContext.from_env()
        self.plan = PLANS[args.plan or ("tiny" if args.tiny else "full")]
        self.budget: TimeBudget | None = None
        run_dir = Path(args.run_dir)
        if isinstance(args.student_seconds, str):  # like:RUN, read before any stage trains
            args.student_seconds, source = allotted_student_seconds(args.student_seconds[5:], run_dir)
            console.log(f"student seconds: {args.student_seconds} s, as allotted to the student of {source}")
        for flag, given in (("--share", args.share), ("--wall", args.wall)):  # every parser has both (add_arguments)
            if given and not args.budget:
                raise ValueError(f"{flag} shapes a time budget: give --budget SECONDS too")
        if args.wall is not None and not (math.isfinite(args.wall) and args.wall > 0):
            raise ValueError(f"--wall: give the seconds this command may take (> 0), got {args.wall}")
        if args.budget:
            b = self.budget_settings
            # wall-clock (time.time) so that the setup before this process, and the imports, count too
            shares = budget_shares(b["shares"], args.share)
            start = time.time() if args.started_at is None else args.started_at
            self.budget = TimeBudget(max(args.budget - b["exit_margin_s"], 1.0), shares, b["eval_reserve_s"],
                                     clock=time.time, start=start,
                                     deadline=None if args.wall is None else start + args.wall - b["exit_margin_s"])
        self.data = DataConfig(data_dir=args.data_dir, download=args.download, root=args.root,
                               val_size=self.plan["val_size"], train_size=self.plan["train_size"], seed=args.seed)
        self.splits = load_splits(self.data)
        self.cache = Path(args.teacher_cache) if args.teacher_cache else run_dir.parent / "teachers"
        self.timings: dict[str, float] = {}
        self.origins: dict[str, str] = {}  # per teacher role: the preset that trained it, or "given"
        self.environment = environment()
        self.stopped: str | None = None  # why the evaluation stopped early, if it did
        console.log(" | ".join(f"{k} {v}" for k, v in self.environment.items()))

    @property
    def budget_settings(self) -> dict[str, Any]:
        """The plan's budget settings (shares, reserves, AutoAttack's images, exit margin), else the defaults."""
        return self.plan.get("budget", DEFAULT_BUDGET)

    @property
    def walled(self) -> bool:
        """Whether --wall ends this call before its budget would: its stages may train for less than the seconds
        they are named by (the teachers are then refused unless cached: :meth:`check_walled_teachers`)."""
        return self.budget is not None and self.args.wall is not None and self.args.wall < self.args.budget

    def check_walled_teachers(self, planned: dict[str, tuple[str, str]]) -> None:
        """Under a --wall shorter than the budget, teachers come from the cache: one trained in the seconds the
        wall left would be cached under the budget's name, and a later full-budget command would take it for its
        own."""
        if not self.walled:
            return
        missing = [r for r, (_, checkpoint) in planned.items() if read_done(Path(checkpoint).parent) is None]
        if missing:
            raise ValueError(f"--wall {self.args.wall:g} is shorter than --budget {self.args.budget:g}, and the "
                             f"{' and '.join(missing)} teacher{'s are' if len(missing) > 1 else ' is'} not cached: a "
                             "call with less time than its budget reuses the teachers of a full-budget command (run "
                             "that first, with the same --budget and teacher flags), or drop --wall")

    @property
    def eval_tf32(self) -> bool:
        """Whether the tables allow TF32 (--eval-tf32, else the plan's choice; labelled in every table)."""
        return self.plan.get("eval_tf32", False) if self.args.eval_tf32 is None else self.args.eval_tf32

    def _train(self, role: str, defaults: dict | None = None, allot: bool = True, **overrides) -> dict:
        """The stage's TrainConfig fields: defaults < the plan's < the role's < overrides (+ its time budget:
        ``allot`` starts the stage's clock, else only its nominal share, for a config checked before it trains);
        epochs left None take the preset's official schedule."""
        a = self.args
        train = {**(defaults or {}), **self.plan["train"], **self.plan[role].get("train", {}), **overrides}
        if train.get("epochs") is None:
            train.pop("epochs", None)
        cap = a.student_seconds if role == "student" else None  # a lever timed like the reference's student
        if self.budget is not None and role in self.budget.shares:
            train["stage_budget_s"] = round(self.budget.nominal(role), 1)
            if allot:  # recorded as allotted (eval.json), which like:RUN reads
                train["time_budget_s"] = self.budget.allot(role, at_most=cap, hold_s=self.eval_hold_s(role))
        if cap:  # its folder named by the cap
            train["stage_budget_s"] = cap
            if allot:
                train["time_budget_s"] = min(train.get("time_budget_s", cap), cap)
        return dict(train, precision=a.precision, device=a.device, seed=a.seed, progress=not a.quiet)

    def eval_hold_s(self, role: str) -> float | None:
        """The seconds the student, the last stage, keeps back for a table without AutoAttack (the plan's
        ``lean_reserve_s``), ``None`` (the reserve) otherwise. The teachers always keep back the whole reserve:
        under one name, one teacher, whatever the call's rows."""
        if role != "student" or self.args.autoattack or self.args.black_box:
            return None
        return self.budget_settings.get("lean_reserve_s")

    def _finish(self, role: str, key: str, t0: float) -> None:
        self.timings[key] = time.perf_counter() - t0
        if self.budget is not None and role in self.budget.shares:
            self.budget.finish(role)
            console.log(f"[bold]stage {role}[/]: {self.timings[key]:.1f} s (allotted {self.budget.allotted[role]:.1f}"
                        f" s); {self.budget.left():.0f} s of the budget left")

    def teacher_preset(self, role: str) -> str:
        """The preset that trains the ``role`` teacher: the plan's, or --adv-preset's for the adversarial one."""
        given = getattr(self.args, "adv_preset", None) if role == "adv" else None
        return given or self.plan[role]["preset"]

    def options(self, role: str, preset: str, given: dict | None = None) -> dict[str, Any]:
        """The options of the ``role`` stage's preset: the plan's that it takes, then ``given`` (and, for a
        teacher, --adv-option's or --nat-option's) over them. The plan's PGD step size goes with its steps: not
        to a preset that takes no PGD steps (N-FGSM's ``alpha`` is its one step), nor where other steps are
        given without a step size (``steps=10`` alone is the preset's own PGD-10)."""
        accepted = get_preset(preset).options()
        options = {k: v for k, v in self.plan[role]["options"].items() if k in accepted}
        given = {**(given_options(f"--{role}-option", getattr(self.args, f"{role}_option", []), preset)
                    if role in TEACHER_ROLES else {}), **(given or {})}
        if "steps" not in accepted or ("steps" in given and "alpha" not in given):
            options.pop("alpha", None)
        return {**options, **given}

    def check_build(self, flag: str, preset: str, model: str, options: dict[str, Any],
                    teachers: dict[str, str] | None = None) -> None:
        """Build the stage's recipe on fresh weights now, so that a bad option value (``reduction=maen``) ends
        the command in one line before any stage trains, not minutes later when that stage starts."""
        cfg = stage_config(preset, model, self.data, "unused", options=options,
                           teachers={role: (arch, None) for role, arch in (teachers or {}).items()})
        try:
            build_recipe(cfg, self.splits.num_classes, self.splits.image_size)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    def teacher_config(self, role: str, model: str | None = None, epochs: int | None = None,
                       allot: bool = True) -> ExperimentConfig:
        """The config that trains the plan's ``role`` teacher (the plan's options its preset takes)."""
        spec, preset = self.plan[role], self.teacher_preset(role)
        model = model or spec["model"]
        # the teachers' usual weight decay where the preset registers none (nfgsm's own 5e-4 stands)
        wd = {} if "weight_decay" in get_preset(preset).schedule else \
            {"weight_decay": 5e-4 if preset == "natural" else 2e-4}
        # a network that comes with its own natural recipe (cifar_airbench94's) trains with it, over the plan's
        # settings and under --nat-option's; a small split keeps at least ten steps an epoch
        world = self.dist.world
        own = (natural_recipe(model, max_batch=max(1, len(self.splits.train) // (10 * world)), world=world)
               if preset == "natural" else None) or {"train": {}, "options": {}}
        return stage_config(preset, model, self.data, "unused",
                            options={**own["options"], **self.options(role, preset)},
                            **self._train(role, wd, allot, epochs=epochs or spec["epochs"], **own["train"]))

    def planned_teacher(self, role: str, checkpoint: str | None = None, model: str | None = None,
                        epochs: int | None = None) -> tuple[str, str]:
        """(timm name, checkpoint) that :meth:`teacher` will give, without training: the given file, or the
        best.pt of the teacher's cache entry."""
        model = model or self.plan[role]["model"]
        if checkpoint is None:
            checkpoint = str(cache_entry(self.teacher_config(role, model, epochs, allot=False), self.cache) / "best.pt")
        return model, checkpoint

    def planned_student(self, preset: str, teachers: dict[str, tuple[str, str]], options: dict | None = None,
                        name: str | None = None) -> ExperimentConfig:
        """The config :meth:`student` will train, before its teachers are (their checkpoints set where they will
        be, unchecked): to refuse a student folder holding a run of another configuration (another budget, other
        teachers) before any stage trains, not once the teachers are trained."""
        cfg = self.student_config(preset, {r: (m, None) for r, (m, _) in teachers.items()}, options, name, allot=False)
        return planned_checkpoints(cfg, {r: checkpoint for r, (_, checkpoint) in teachers.items()})

    def teacher(self, role: str, checkpoint: str | None = None, model: str | None = None,
                epochs: int | None = None) -> tuple[str, str]:
        """(timm name, checkpoint) of a teacher: the given file, or the cached (trained once) one."""
        model = model or self.plan[role]["model"]
        if checkpoint is None:
            t0 = time.perf_counter()
            cfg = self.teacher_config(role, model, epochs)
            checkpoint = str(train_cached(cfg, self.cache, self.splits, console=console, dist=self.dist))
            self._finish(role, f"{role}_teacher_s", t0)
            self.origins[role] = self.teacher_preset(role).upper()
        else:
            self.origins[role] = "given"
            if self.budget is not None and role in self.budget.shares:
                self.budget.skip(role)
        return model, checkpoint

    def student_config(self, preset: str, teachers: dict[str, tuple[str, str]],
                       options: dict | None = None, name: str | None = None, allot: bool = True) -> ExperimentConfig:
        """The config that trains the student of ``preset`` from ``teachers``, in the run folder ``name``
        (default: the preset's name) under --run-dir."""
        spec, a = self.plan["student"], self.args
        return stage_config(preset, a.student or spec["model"], self.data, Path(a.run_dir) / (name or preset),
                            options=self.options("student", preset, options), teachers=teachers,
                            **self._train("student", allot=allot, epochs=a.epochs or spec["epochs"],
                                          compile=a.compile))

    def student(self, preset: str, teachers: dict[str, tuple[str, str]], options: dict | None = None,
                name: str | None = None, label: str | None = None) -> Path:
        """Train the student (``label`` names its time in the timings, default the preset's name)."""
        t0 = time.perf_counter()
        cfg = self.student_config(preset, teachers, options, name)
        done = read_done(cfg.run_dir)
        given = done.get("time_budget_s") if done is not None else None
        if given and self.budget is not None:  # finished earlier: the seconds it trained in, not those left now
            self.budget.allotted["student"] = given
        asked = self.args.student_seconds or cfg.train.stage_budget_s  # the cap, else its share's name
        seconds = given if done is not None else cfg.train.time_budget_s
        if asked and seconds is not None and seconds < asked - 1 and (self.args.student_seconds or self.walled):
            console.log(f"[bold red]student: {'trained' if done is not None else 'to train'} in {seconds:.0f} s of "
                        f"the {asked:.0f} s it is named by (--wall, --budget): not timed like a run given its "
                        "full seconds")
        best = train_stage(cfg, self.splits, console=console, dist=self.dist)
        self._finish("student", f"{label or preset}_s", t0)
        return best

    def table(self, preset: str, best: Path, surrogate: tuple[str, str] | None = None,
              extra: dict | None = None, model: str | None = None, role: str = "student",
              out: Path | None = None) -> dict:
        """The robustness table of a student (rank 0 only), saved as eval.json beside its checkpoint (or in
        ``out``); ``model`` and ``role``: another network's (a teacher's), by its timm name."""
        a = self.args
        device = self.dist.device(a.device)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        attacks = {**standard_attacks(), **(extra or {})}
        if a.autoattack:
            attacks["autoattack"] = AutoAttack()
        if a.black_box:
            net = load_model(*surrogate, self.splits.num_classes).to(device) if surrogate else None
            attacks.update(black_box_attacks(net))
        t0 = time.perf_counter()
        model = model or a.student or self.plan["student"]["model"]
        report = evaluate_checkpoint(model, best, self.splits, attacks, device, a.eval_n or self.plan["eval_n"],
                                     slow_subsets(a.slow_n), tf32=self.eval_tf32, seed=a.seed)  # random starts
        self.timings[f"{preset}_eval_s"] = time.perf_counter() - t0
        report.meta.update(timings=self.timings, data=a.data_dir or "torchvision", preset=preset)
        console.print(report.table(f"{preset} {role} ({model})"))
        report.save_json((out or best.parent) / "eval.json")
        return report.to_dict()

    def slow_n(self, n: int) -> int:
        """Images of the ``n`` evaluated for AutoAttack and the black-box rows: --slow-n, else the plan's first
        images under a time budget, else all ``n`` (the full-test-set protocol)."""
        if self.args.slow_n:
            return min(self.args.slow_n, n)
        return min(self.budget_settings["autoattack_n"], n) if self.budget is not None else n

    def reference_table(self, preset: str, best: Path, teachers: dict[str, tuple[str, str]]) -> dict:
        """The student's table beside its adversarial teacher's (the speedrun's is a SAT model: the paper's MTARD
        vs SAT row) and the natural teacher's clean accuracy, on the test set; rows run in priority order while
        the budget lasts. Saved as eval.json beside the student's checkpoint; the table is printed last."""
        from multiteach.checkpoint import load_checkpoint

        a = self.args
        device = self.dist.device(a.device)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        x, y = eval_tensors(self.splits, a.eval_n or self.plan["eval_n"])
        left = self.budget.left if self.budget is not None else (lambda: float("inf"))
        ev = TimedEvaluation(x, y, left, batch_size=500, device=device, tf32=self.eval_tf32, seed=a.seed)
        student_name = a.student or self.plan["student"]["model"]

        def selected(checkpoint: str | Path) -> str:
            """Which weights a checkpoint of this library holds (', ema weights, epoch 40'); '' for another's."""
            picked = load_checkpoint(checkpoint)
            if not isinstance(picked, dict) or not {"epoch", "weights"} <= picked.keys():  # another library's file
                return ""
            return f", {picked['weights']} weights, epoch {picked['epoch']}"

        # a lever's options in its label: an MTARD student with fixed weights is not ANL's (H200 run 7)
        lever = f" [{'; '.join(a.option)}]" if a.option else ""
        label = f"{preset} student{lever} ({student_name}{selected(best)})"
        models = {label: load_model(student_name, best, self.splits.num_classes).to(device)}
        if "adv" in teachers:
            teacher_label = f"adv teacher ({teachers['adv'][0]}, {self.origins.get('adv', 'given')}" \
                            f"{selected(teachers['adv'][1])})"
            models[teacher_label] = load_model(*teachers["adv"], self.splits.num_classes).to(device)
        student, *rest = models
        t0 = time.perf_counter()
        rows = standard_attacks()
        aa_n = self.slow_n(len(y))
        aa = AutoAttack() if a.autoattack else None
        nat_clean = None

        def run_rows() -> None:
            nonlocal nat_clean
            ev.clean(student, models[student])
            for name, attack in rows.items():
                ev.row(student, models[student], name, attack, required=name == "pgd_sat")
            if "nat" in teachers:
                nat = load_model(*teachers["nat"], self.splits.num_classes).to(device)
                nat_clean = ev.clean(f"nat teacher ({teachers['nat'][0]}{selected(teachers['nat'][1])})", nat)
            for t in rest:
                ev.clean(t, models[t])
                ev.row(t, models[t], "pgd_sat", rows["pgd_sat"])
            if ev.tf32:  # what TF32 changes: the student's PGD_SAT on the first images in strict fp32
                ev.row(student, models[student], "pgd_sat_fp32", standard_attacks()["pgd_sat"], n=1000, tf32=False)
            for t in rest:  # the teacher's row (~15 s) before AutoAttack, whose last call may be cut at the budget
                for name, attack in rows.items():
                    if name != "pgd_sat":
                        ev.row(t, models[t], name, attack)
            if aa is not None:
                ev.row(student, models[student], "autoattack", aa, n=aa_n, chunk=_chunks(aa_n))
            if a.black_box and "adv" in teachers:
                for name, attack in black_box_attacks(models[rest[0]]).items():
                    ev.row(student, models[student], name, attack, n=aa_n)
            if aa is not None:
                for t in rest:
                    ev.row(t, models[t], "autoattack", aa, n=aa_n, chunk=_chunks(aa_n))

        try:
            run_rows()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (run_command): keep the rows done, then exit 3
            self.stopped = "stopped by a signal during the evaluation: the table holds the rows finished before it"
            ev.skipped.append("the rest (stopped by a signal)")
            ev.reports.setdefault(student, Report(n=0))
        self.timings[f"{preset}_eval_s"] = time.perf_counter() - t0
        gap = w_robust_gap(ev.reports[student], ev.reports[rest[0]]) if rest and rest[0] in ev.reports else {}
        result = {**ev.reports[student].to_dict(), "w_robust_gap": gap,
                  "models": {k: r.to_dict() for k, r in ev.reports.items()}, "stopped": self.stopped,
                  "nat_teacher_clean": nat_clean, "skipped": ev.skipped, "timings": self.timings, "tf32": ev.tf32,
                  "budget": self.budget.summary() if self.budget is not None else None,
                  "student_seconds": a.student_seconds, "options": list(a.option),
                  "data": a.data_dir or "torchvision", "preset": preset, "environment": self.environment}
        atomic_write_json(result, best.parent / "eval.json")  # a kill mid-write leaves the previous table
        self.result_table = reference_rich_table(ev.reports, self.timings, ev.skipped, ev.tf32, gap)
        return result


TEACHER_ROLES = ("adv", "nat")  # each with its --ROLE-option, --ROLE-teacher, --ROLE-arch


def environment() -> dict[str, str]:
    """What a reported figure ran on: the device, torch, timm."""
    import timm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "timm": timm.__version__}


def _chunks(n: int) -> tuple[int, ...]:
    """AutoAttack slices: all n at once, else the most that fit, in twentieths of n (1,000, 950, ..., 50). Each
    call pays its fixed, latency-bound part again (~44 s on an H200, run 4 in benchmarks/RESULTS.md), so one
    call of 900 beats 500 then 250: halves and quarters covered 750 images in 118.6 s there, where 1,000 in one
    call take ~85 s."""
    step = max(n // 20, 1)
    return tuple(range(max(n, 1), 0, -step))


def w_robust_gap(student: Report, teacher: Report) -> dict[str, float]:
    """W-Robust of the student minus its adversarial teacher's, in points, per attack both ran on the same images
    (the MTARD vs SAT comparison, read off the table)."""
    theirs = {(r.attack, r.n): r.w_robust for r in teacher.rows}
    return {r.attack: round(100 * (r.w_robust - theirs[(r.attack, r.n)]), 2) for r in student.rows
            if (r.attack, r.n) in theirs}


def reference_rich_table(reports: dict, timings: dict[str, float], skipped: list[str], tf32: bool = False,
                         gap: dict[str, float] | None = None) -> Any:
    """One table: every model's rows (clean, robust, W-Robust on the same images); below it the student's
    W-Robust against its adversarial teacher's and the stage times. Names are text, not markup (a lever's label
    holds its options in square brackets)."""
    from rich.markup import escape
    from rich.table import Table

    n = max((r.n for r in reports.values()), default=0)
    versus = ", ".join(f"{k} {v:+.2f}" for k, v in (gap or {}).items())
    t = Table(title=f"Test set, n = {n} ({precision_label(tf32)}, eval mode, L-inf eps 8/255)",
              caption=(f"W-Robust, student - adversarial teacher (points): {versus}\n" if versus else "")
              + "stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
              + (f"; not run: {escape(', '.join(skipped))}" if skipped else ""))
    for col in ("model", "attack", "n", "clean %", "robust %", "W-Robust %", "s"):
        t.add_column(col, justify="left" if col in ("model", "attack") else "right")
    for label, rep in reports.items():
        name = escape(label)
        if not rep.rows:
            clean = rep.meta.get("clean")
            t.add_row(name, "clean only", str(rep.n), f"{100 * clean:.2f}" if clean is not None else "-", "", "", "")
        for i, r in enumerate(rep.rows):
            t.add_row(name if i == 0 else "", r.attack, str(r.n), f"{100 * r.clean:.2f}", f"{100 * r.robust:.2f}",
                      f"{100 * r.w_robust:.2f}", f"{r.seconds:.1f}")
    return t


def plot(run_dir: Path) -> None:
    try:
        from multiteach.plots import plot_run
    except ImportError:
        console.log("matplotlib not installed: no plots (pip install 'multiteach[plot]')")
        return
    try:
        for f in plot_run(run_dir):
            console.log(f"wrote {f}")
    except Exception as e:  # figures are a by-product: never lose the table to them
        console.log(f"plots failed: {type(e).__name__}: {e}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--adv-teacher", help="adversarial teacher checkpoint (skips its training)")
    p.add_argument("--adv-arch", help="its timm name (default: the plan's)")
    p.add_argument("--adv-preset", help="the recipe that trains it (default: the plan's, e.g. sat; nfgsm, trades)")
    p.add_argument("--adv-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of that preset, over the plan's (e.g. label_smoothing=0.1, steps=7; the value "
                        "read as TOML); repeatable")
    p.add_argument("--nat-teacher", help="natural teacher checkpoint (skips its training)")
    p.add_argument("--nat-arch", help="its timm name (default: the plan's; a network with its own natural recipe, "
                                      "cifar_airbench94, trains with it)")
    p.add_argument("--nat-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of its preset (natural), over the plan's and its network's recipe (e.g. "
                        "label_smoothing=0); repeatable")
    p.add_argument("--preset", default="mtard", help="student recipe: mtard, bmtard, rslad, ard, baseline_mt, ...")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the student's preset, over the plan's (e.g. reduction=mean, the official "
                        "KL scale; beta=2; steps=10, with the preset's own step unless alpha is given); the student "
                        "trains in its own folder, named by them; repeatable")
    p.add_argument("--folder-by-config", action="store_true",
                   help="name the student's folder by its configuration too (mtard-1a2b3c4d): another configuration "
                        "(budget, teachers, data) trains in its own folder instead of being refused; the same one "
                        "resumes, or is evaluated again (benchmarks/reference.sh uses it)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    run = Pipeline(args)
    need = get_preset(args.preset).teachers
    options = given_options("--option", args.option, args.preset)
    for flag, name in (("--student", args.student), ("--nat-arch", args.nat_arch), ("--adv-arch", args.adv_arch)):
        if name:  # a typo ends the command now, not after the stages before the one it names have trained
            try:
                check_model_name(name)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    archs = {"nat": args.nat_arch or run.plan["nat"]["model"], "adv": args.adv_arch or run.plan["adv"]["model"]}
    if args.option:  # option values checked before any training
        run.check_build("--option", args.preset, args.student or run.plan["student"]["model"],
                        run.options("student", args.preset, options), {k: v for k, v in archs.items() if k in need})
    for role in TEACHER_ROLES:
        if getattr(args, f"{role}_option"):
            if getattr(args, f"{role}_teacher"):
                raise ValueError(f"--{role}-option sets how the {role} teacher trains, and --{role}-teacher gives a "
                                 f"trained one: drop one of them")
            preset = run.teacher_preset(role)
            run.check_build(f"--{role}-option", preset, archs[role], run.options(role, preset))
    given = {"nat": (args.nat_teacher, args.nat_arch, args.nat_epochs),
             "adv": (args.adv_teacher, args.adv_arch, args.adv_epochs)}
    planned = {r: run.planned_teacher(r, *given[r]) for r in need if r in given}
    folder = student_folder(args.preset, args.option)
    if args.folder_by_config:  # the digest of what trains the student: another configuration, another folder
        folder += "-" + run.planned_student(args.preset, planned, options, folder).digest()[:8]
    check_run_dir(run.planned_student(args.preset, planned, options, folder))  # before any stage trains
    run.check_walled_teachers({r: run.planned_teacher(r, *spec) for r, spec in given.items() if spec[0] is None})
    teachers = {r: run.teacher(r, *spec) for r, spec in given.items()}
    best = run.student(args.preset, {k: v for k, v in teachers.items() if k in need}, options, folder)
    if not run.dist.is_main:
        return {}
    plot(best.parent)
    report = run.reference_table(args.preset, best, teachers)
    console.log(f"stage times {json.dumps({k: round(v, 1) for k, v in run.timings.items()})}")
    Console().print(run.result_table)  # last: the device tool and CI logs show the end of the output
    if run.stopped:
        raise StageStopped(f"{run.stopped} ({best.parent / 'eval.json'})")
    return report


if __name__ == "__main__":
    run_command(main)
