"""N = 3: MTARD's adversarial and natural teachers plus an L2-robust teacher on L2-PGD inputs, balanced by ANL.

    python examples/three_teachers.py --data-dir DIR            # reuses the cached teachers of mtard_cifar.py
    python examples/three_teachers.py --tiny --data-dir DIR     # CPU smoke run

The third teacher is trained with PGD-AT under the L2 norm (eps 0.5) and supervises the student on L2-PGD
examples crafted against it: robustness to a second threat model, which no two-teacher recipe covers. The
table adds an L2 PGD-20 row (eps 0.5) beside the L-inf rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mtard_cifar import Pipeline, add_arguments, console, plot  # noqa: E402

from multiteach.pipeline import check_run_dir, run_command  # noqa: E402
from multiteach.transforms import PGD  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--weighter", default="anl", help="anl (default), dwa, uw, rlw or fixed")
    p.set_defaults(run_dir="runs/three_teachers")
    args = p.parse_args(argv)
    run = Pipeline(args)
    epochs = {"nat": args.nat_epochs, "adv": args.adv_epochs}
    planned = {role: run.planned_teacher(role, epochs=epochs.get(role)) for role in ("nat", "adv", "l2")}
    check_run_dir(run.planned_student("mtard3", planned, {"weighter": args.weighter}))  # before any stage trains
    teachers = {role: run.teacher(role, epochs=epochs.get(role)) for role in ("nat", "adv", "l2")}
    best = run.student("mtard3", teachers, options={"weighter": args.weighter})
    if not run.dist.is_main:
        return {}
    l2_row = {"pgd_l2": PGD(0.5, 0.125, 20, norm="L2", start="uniform")}
    report = run.table("mtard3", best, surrogate=teachers["adv"], extra=l2_row)
    plot(best.parent)
    console.log(f"stage times {run.timings}")
    return report


if __name__ == "__main__":
    run_command(main)
