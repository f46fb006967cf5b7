"""The MTARD paper's Table 2 layout: defenses trained under one budget from the same teachers, one table.

    python benchmarks/table2.py --data-dir DIR                        # GPU: the FULL plan of mtard_cifar.py
    python benchmarks/table2.py --data-dir DIR --tiny --eval-n 100    # CPU: shows that it runs
    python benchmarks/table2.py --data-dir DIR --presets sat rslad mtard adaad --ablations
    python benchmarks/table2.py --data-dir DIR --plan cpu --presets mtard mtard:beta=2 baseline_mt --teacher-row

Natural, SAT and TRADES train the student directly; ARD, RSLAD and MTARD (and the Fig. 2 ablations with
--ablations) distil from the cached teachers of examples/mtard_cifar.py (trained once, reused; a budgeted run's
teachers are named by their budget share, so table2, which takes no budget, trains its own). Every
student gets the same epochs, batch, schedule and seed, is selected on the validation split, and is
evaluated by the same suite (fp32, eval mode). Writes table2.json in --run-dir. ``--presets`` takes any
registered preset (``multiteach presets`` lists them): teacher roles ``adv``/``nat``/``l2`` get the cached
teachers, ``peer`` (an online peer) starts from a fresh network of the student's architecture, and any other
role (the ensemble presets' ``t1``...) the natural teacher. ``PRESET:KEY=VALUE,...`` trains a preset with other
options (a lever: ``mtard:beta=2``), in its own folder; ``--teacher-row`` adds the adversarial teacher's own row
(a SAT model under the speedrun and cpu plans: the MTARD vs SAT comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from mtard_cifar import Pipeline, add_arguments, given_options, student_folder  # noqa: E402

from multiteach.pipeline import check_run_dir, run_command  # noqa: E402
from multiteach.presets import get_preset  # noqa: E402

DEFENSES = ["natural", "sat", "trades", "ard", "rslad", "mtard"]
ABLATIONS = ["baseline", "baseline_mt"]  # baseline_mt_anl is mtard
COLUMNS = [("fgsm", "FGSM"), ("pgd_sat", "PGD_SAT"), ("pgd_trades", "PGD_TRADES"), ("cw_inf", "CW_inf"),
           ("autoattack", "AA")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--presets", "--defenses", dest="presets", nargs="+", default=DEFENSES,
                   help=f"presets to train and evaluate (default: {' '.join(DEFENSES)}); PRESET:KEY=VALUE,... "
                        "with other options, e.g. mtard:beta=2")
    p.add_argument("--ablations", action="store_true", help="add the Fig. 2 ablations (baseline, baseline_mt)")
    p.add_argument("--teacher-row", action="store_true",
                   help="add the adversarial teacher's own row, evaluated by the same suite")
    p.set_defaults(run_dir="runs/table2")
    args = p.parse_args(argv)
    if args.budget or args.share or args.wall:
        p.error("--budget, --share and --wall plan one student (examples/mtard_cifar.py, benchmarks/reference.sh): "
                "train each defense for set epochs here")
    students = {spec: parse_spec(spec) for spec in args.presets + (ABLATIONS if args.ablations else [])}
    given = len(args.presets) + args.ablations * len(ABLATIONS)  # a spec repeated is one key of `students`
    trained = {(preset, json.dumps(options, sort_keys=True, default=str)) for preset, (options, _) in students.values()}
    if len(trained) < given or len({folder for _, (_, folder) in students.values()}) < given:
        p.error(f"--presets {' '.join(args.presets)}: a student given twice (the same preset and options)")
    run = Pipeline(args)
    needed = {r for preset, _ in students.values() for r in get_preset(preset).teachers} | {"adv"}  # the surrogate
    planned = {r: run.planned_teacher(r) for r in ("nat", "adv", "l2") if r in needed}
    for preset, (options, folder) in students.values():  # every student's folder checked before any stage trains
        check_run_dir(run.planned_student(preset, {r: teacher_for(r, planned, run, run.planned_teacher)
                                                   for r in get_preset(preset).teachers}, options, folder))
    teachers = {r: run.teacher(r) for r in ("nat", "adv", "l2") if r in needed}
    results = {}
    if args.teacher_row and run.dist.is_main:
        out = Path(args.run_dir) / "adv_teacher"  # not into the teacher cache, which other commands share
        out.mkdir(parents=True, exist_ok=True)
        # no transfer rows: the teacher is their surrogate (Square, with --black-box, still runs)
        results[f"adv teacher ({run.origins['adv']})"] = run.table(
            "adv", Path(teachers["adv"][1]), model=teachers["adv"][0], role="teacher", out=out)
    for spec, (preset, (options, folder)) in students.items():
        best = run.student(preset, {r: teacher_for(r, teachers, run) for r in get_preset(preset).teachers},
                           options, folder, label=spec)
        if run.dist.is_main:
            results[spec] = run.table(spec, best, surrogate=teachers["adv"])
    if not run.dist.is_main:
        return {}
    table = Table(title="Table 2 layout: robust / W-Robust (%) per attack, L-inf eps 8/255 "
                        f"(n = {next(iter(results.values()))['n']})")
    table.add_column("defense")
    table.add_column("clean", justify="right")
    present = [(k, name) for k, name in COLUMNS if any(k in {r["attack"] for r in v["rows"]} for v in results.values())]
    for _, name in present:
        table.add_column(name, justify="right")
    for preset, rep in results.items():
        rows = {r["attack"]: r for r in rep["rows"]}
        clean = next(iter(rows.values()))["clean"] if rows else 0.0
        table.add_row(preset, f"{100 * clean:.2f}", *(
            f"{100 * rows[k]['robust']:.2f} / {100 * rows[k]['w_robust']:.2f}" if k in rows else "-"
            for k, _ in present))
    Console().print(table)
    out = Path(args.run_dir) / "table2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "timings": run.timings}, indent=2))
    return results


def parse_spec(spec: str) -> tuple[str, tuple[dict, str]]:
    """``mtard:beta=2,steps=7`` -> ("mtard", ({"beta": 2, "steps": 7}, "mtard-beta=2-steps=7")): the preset, its
    options (checked to be the preset's) and the run folder they name; a bare name takes the preset's own."""
    preset, _, rest = spec.partition(":")
    pairs = [pair for pair in rest.split(",") if pair]
    get_preset(preset)  # an unknown name: the registry's one-line error
    return preset, (given_options(f"--presets {spec}:", pairs, preset), student_folder(preset, pairs))


def teacher_for(role: str, teachers: dict[str, tuple[str, str]], run: Pipeline,
                make: Callable[[str], tuple[str, str]] | None = None) -> tuple[str, str | None]:
    """(timm name, checkpoint) for a preset's teacher role (see the module docstring); ``make`` gives a teacher
    not yet in ``teachers`` (default: trains it; ``run.planned_teacher``: where it will be)."""
    if role in teachers:
        return teachers[role]
    if role == "peer":
        return run.args.student or run.plan["student"]["model"], None
    if "nat" not in teachers:
        teachers["nat"] = (make or run.teacher)("nat")
    return teachers["nat"]


if __name__ == "__main__":
    run_command(main)
