"""Reference run: MTARD on CIFAR-10, from nothing to the robustness table.

    python examples/mtard_cifar.py --data-dir /path/with/train.npz          # numpy files (x uint8 NHWC, y)
    python examples/mtard_cifar.py --download                               # torchvision's CIFAR-10
    python examples/mtard_cifar.py --adv-teacher adv.pt --nat-teacher nat.pt --data-dir ...
    python examples/mtard_cifar.py --tiny --data-dir ...                    # CPU smoke run, about a minute

Stages: natural teacher -> adversarial teacher -> student (MTARD by default, --preset picks another) ->
evaluation table and plots. Teachers are trained once into a cache keyed by recipe and seed (--teacher-cache)
and reused by any later run; every stage resumes if interrupted and is skipped once finished, so the
pipeline can run as several shorter commands. Every model is selected on a held-out validation split,
never on the test set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from multiteach.build import load_splits
from multiteach.config import DataConfig
from multiteach.distributed import DistContext
from multiteach.evaluate import AutoAttack, black_box_attacks, slow_subsets, standard_attacks
from multiteach.pipeline import evaluate_checkpoint, stage_config, train_cached, train_stage
from multiteach.presets import get_preset
from multiteach.teachers import load_model

console = Console(stderr=True)

# FULL: the H100 plan (see benchmarks/RESULTS.md for what it reached); TINY: a CPU smoke run.
FULL = {
    "nat": dict(model="cifar_resnet18", preset="natural", epochs=20, options={}),
    "adv": dict(model="cifar_resnet18", preset="sat", epochs=30, options={"steps": 5}),
    "l2": dict(model="cifar_resnet18", preset="sat", epochs=20,
               options={"steps": 5, "norm": "L2", "eps": 0.5, "alpha": 0.125}),
    "student": dict(model="cifar_resnet18", epochs=40, options={}),
    "train": dict(batch_size=256, lr=0.2, warmup_epochs=1.0, schedule="cosine", milestones=[]),
    "val_size": 1000, "train_size": None, "eval_n": None,
}
TINY = {
    "nat": dict(model="cifar_resnet8", preset="natural", epochs=4, options={}),
    "adv": dict(model="cifar_resnet8", preset="sat", epochs=2, options={"steps": 3}),
    "l2": dict(model="cifar_resnet8", preset="sat", epochs=2,
               options={"steps": 3, "norm": "L2", "eps": 0.5, "alpha": 0.25}),
    "student": dict(model="cifar_resnet8", epochs=3, options={"steps": 3}),
    "train": dict(batch_size=32, lr=0.05, schedule="cosine", milestones=[]),
    "val_size": 200, "train_size": 1200, "eval_n": 200,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options every pipeline example shares."""
    p.add_argument("--data-dir", help="folder with train.npz / test.npz")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 through torchvision")
    p.add_argument("--root", default="data", help="torchvision data folder")
    p.add_argument("--run-dir", default="runs/mtard_cifar")
    p.add_argument("--teacher-cache", help="teachers trained once, reused by recipe and seed (default: "
                                           "a 'teachers' folder beside --run-dir)")
    p.add_argument("--student", help="student timm name (default cifar_resnet18)")
    p.add_argument("--epochs", type=int, help="student epochs")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a small slice, tiny models")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student stage (about a minute of compilation, ~1.3x faster steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, help="evaluate on the first n test images (default: all)")
    p.add_argument("--autoattack", action="store_true", help="add standard AutoAttack to the table")
    p.add_argument("--black-box", action="store_true", help="add transfer (from the adversarial teacher) and Square")
    p.add_argument("--slow-n", type=int, help="run AutoAttack and the black-box rows on the first n images only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class Pipeline:
    """Teachers (cached), one student, its table: what the examples and benchmarks/table2.py share."""

    def __init__(self, args: argparse.Namespace, dist: DistContext | None = None) -> None:
        if not args.data_dir and not args.download:
            raise SystemExit("give --data-dir (train.npz/test.npz) or --download (torchvision)")
        self.args, self.dist = args, dist or DistContext.from_env()
        self.plan = TINY if args.tiny else FULL
        self.data = DataConfig(data_dir=args.data_dir, download=args.download, root=args.root,
                               val_size=self.plan["val_size"], train_size=self.plan["train_size"], seed=args.seed)
        self.splits = load_splits(self.data)
        run_dir = Path(args.run_dir)
        self.cache = Path(args.teacher_cache) if args.teacher_cache else run_dir.parent / "teachers"
        self.timings: dict[str, float] = {}

    def _train(self, **overrides) -> dict:
        a = self.args
        return dict(self.plan["train"], precision=a.precision, device=a.device, seed=a.seed, progress=not a.quiet,
                    **overrides)

    def teacher(self, role: str, checkpoint: str | None = None, model: str | None = None,
                epochs: int | None = None) -> tuple[str, str]:
        """(timm name, checkpoint) of a teacher: the given file, or the cached (trained once) one."""
        spec = self.plan[role]
        model = model or spec["model"]
        if checkpoint is None:
            t0 = time.perf_counter()
            cfg = stage_config(spec["preset"], model, self.data, "unused", options=spec["options"],
                               **self._train(epochs=epochs or spec["epochs"],
                                             weight_decay=5e-4 if spec["preset"] == "natural" else 2e-4))
            checkpoint = str(train_cached(cfg, self.cache, self.splits, console=console, dist=self.dist))
            self.timings[f"{role}_teacher_s"] = time.perf_counter() - t0
        return model, checkpoint

    def student(self, preset: str, teachers: dict[str, tuple[str, str]], options: dict | None = None) -> Path:
        spec, a = self.plan["student"], self.args
        model = a.student or spec["model"]
        t0 = time.perf_counter()
        accepted = get_preset(preset).options()  # the plan's attack steps, where the preset takes them
        plan_options = {k: v for k, v in spec["options"].items() if k in accepted}
        cfg = stage_config(preset, model, self.data, Path(a.run_dir) / preset,
                           options={**plan_options, **(options or {})}, teachers=teachers,
                           **self._train(epochs=a.epochs or spec["epochs"], compile=a.compile))
        best = train_stage(cfg, self.splits, console=console, dist=self.dist)
        self.timings[f"{preset}_s"] = time.perf_counter() - t0
        return best

    def table(self, preset: str, best: Path, surrogate: tuple[str, str] | None = None,
              extra: dict | None = None) -> dict:
        """The robustness table of a student (rank 0 only), saved as eval.json beside its checkpoint."""
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
        model = a.student or self.plan["student"]["model"]
        report = evaluate_checkpoint(model, best, self.splits, attacks, device, a.eval_n or self.plan["eval_n"],
                                     slow_subsets(a.slow_n))
        self.timings[f"{preset}_eval_s"] = time.perf_counter() - t0
        report.meta.update(timings=self.timings, data=a.data_dir or "torchvision", preset=preset)
        console.print(report.table(f"{preset} student ({model})"))
        report.save_json(best.parent / "eval.json")
        return report.to_dict()


def plot(run_dir: Path) -> None:
    try:
        from multiteach.plots import plot_run
    except ImportError:
        console.log("matplotlib not installed: no plots (pip install 'multiteach[plot]')")
        return
    for f in plot_run(run_dir):
        console.log(f"wrote {f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--adv-teacher", help="adversarial teacher checkpoint (skips its training)")
    p.add_argument("--adv-arch", help="its timm name (default: the plan's)")
    p.add_argument("--nat-teacher", help="natural teacher checkpoint (skips its training)")
    p.add_argument("--nat-arch", help="its timm name (default: the plan's)")
    p.add_argument("--nat-epochs", type=int, help="natural teacher epochs")
    p.add_argument("--adv-epochs", type=int, help="adversarial teacher epochs")
    p.add_argument("--preset", default="mtard", help="student recipe: mtard, bmtard, rslad, ard, baseline_mt, ...")
    args = p.parse_args(argv)
    run = Pipeline(args)
    need = get_preset(args.preset).teachers
    teachers = {"nat": run.teacher("nat", args.nat_teacher, args.nat_arch, args.nat_epochs),
                "adv": run.teacher("adv", args.adv_teacher, args.adv_arch, args.adv_epochs)}
    best = run.student(args.preset, {k: v for k, v in teachers.items() if k in need})
    if not run.dist.is_main:
        return {}
    report = run.table(args.preset, best, surrogate=teachers["adv"])
    plot(best.parent)
    console.log(f"stage times {json.dumps({k: round(v, 1) for k, v in run.timings.items()})}")
    return report


if __name__ == "__main__":
    main()
