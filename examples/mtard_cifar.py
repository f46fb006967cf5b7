"""Reference run: MTARD on CIFAR-10, from nothing to the robustness table.

    python examples/mtard_cifar.py --data-dir /path/with/train.npz          # numpy files (x uint8 NHWC, y)
    python examples/mtard_cifar.py --download                               # torchvision's CIFAR-10
    python examples/mtard_cifar.py --adv-teacher adv.pt --nat-teacher nat.pt --data-dir ...
    python examples/mtard_cifar.py --tiny --data-dir ...                    # CPU smoke run, < 2 minutes

Stages (each writes its own run directory under --run-dir, resumes if interrupted, and is skipped once
finished): natural teacher -> adversarial teacher -> MTARD student -> evaluation table (+ plots). Teachers
given by --adv-teacher / --nat-teacher skip their stage. Every model is selected on a held-out validation
split, never on the test set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from multiteach.build import build_trainer, eval_tensors, load_splits
from multiteach.checkpoint import load_weights
from multiteach.config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainConfig
from multiteach.distributed import DistContext
from multiteach.evaluate import AutoAttack, black_box_attacks, evaluate, standard_attacks
from multiteach.teachers import create_model

console = Console(stderr=True)
DIST = DistContext.from_env()  # torchrun sets WORLD_SIZE/RANK; a single process otherwise

# Full run: sized for about half an hour on one H100 (see benchmarks/RESULTS.md); --tiny: a CPU smoke run.
FULL = {
    "nat": dict(model="cifar_resnet18", preset="natural", epochs=20, schedule="cosine", options={}),
    "adv": dict(model="cifar_resnet18", preset="sat", epochs=30, schedule="cosine",
                options={"steps": 5}),
    "student": dict(model="cifar_resnet18", epochs=40, schedule="cosine", options={}),
    "batch_size": 256, "lr": 0.2, "warmup_epochs": 1.0, "val_size": 1000, "eval_n": None,
}
TINY = {
    "nat": dict(model="cifar_resnet8", preset="natural", epochs=4, schedule="cosine", options={}),
    "adv": dict(model="cifar_resnet8", preset="sat", epochs=2, schedule="cosine", options={"steps": 3}),
    "student": dict(model="cifar_resnet8", epochs=3, schedule="cosine", options={"steps": 3}),
    "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.0, "val_size": 200, "train_size": 1200, "eval_n": 200,
}


def stage_config(args: argparse.Namespace, plan: dict, name: str, preset: str, model: str, epochs: int,
                 schedule: str, options: dict, teachers: dict | None = None) -> ExperimentConfig:
    return ExperimentConfig(
        preset=preset, options=options, student=ModelConfig(model=model), teachers=teachers or {},
        data=DataConfig(data_dir=args.data_dir, download=args.download, root=args.root,
                        val_size=plan["val_size"], train_size=plan.get("train_size")),
        train=TrainConfig(epochs=epochs, batch_size=plan["batch_size"], lr=plan["lr"], schedule=schedule,
                          weight_decay=5e-4 if preset == "natural" else 2e-4, milestones=[],
                          warmup_epochs=plan["warmup_epochs"],
                          precision=args.precision, device=args.device, seed=args.seed,
                          progress=not args.quiet, compile=args.compile and name == args.preset),
        run_dir=str(Path(args.run_dir) / name),
    )


def run_stage(cfg: ExperimentConfig, splits, args: argparse.Namespace) -> Path:
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, console=console, splits=splits, dist=DIST)
    result = trainer.fit(resume=True)
    if result.status != "finished":
        raise SystemExit(f"{cfg.run_dir}: {result.status}; run the same command again to resume")
    console.log(f"[bold]{cfg.run_dir}[/]: {result.epoch} epochs, best on validation {result.best} "
                f"({time.perf_counter() - t0:.0f} s this call)")
    return Path(cfg.run_dir) / "best.pt"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with train.npz / test.npz")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 through torchvision")
    p.add_argument("--root", default="data", help="torchvision data folder")
    p.add_argument("--run-dir", default="runs/mtard_cifar")
    p.add_argument("--adv-teacher", help="adversarial teacher checkpoint (skips its stage)")
    p.add_argument("--adv-arch", help="its timm name (default: the plan's)")
    p.add_argument("--nat-teacher", help="natural teacher checkpoint (skips its stage)")
    p.add_argument("--nat-arch", help="its timm name (default: the plan's)")
    p.add_argument("--student", help="student timm name (default cifar_resnet18)")
    p.add_argument("--epochs", type=int, help="student epochs")
    p.add_argument("--nat-epochs", type=int, help="natural teacher epochs")
    p.add_argument("--adv-epochs", type=int, help="adversarial teacher epochs")
    p.add_argument("--preset", default="mtard", help="student recipe: mtard, bmtard, rslad, ard, baseline_mt, ...")
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
    args = p.parse_args(argv)
    if not args.data_dir and not args.download:
        p.error("give --data-dir (train.npz/test.npz) or --download (torchvision)")
    plan = TINY if args.tiny else FULL
    data_cfg = DataConfig(data_dir=args.data_dir, download=args.download, root=args.root, val_size=plan["val_size"],
                          train_size=plan.get("train_size"))
    splits = load_splits(data_cfg)
    timings: dict[str, float] = {}

    teachers = {}
    for role, given, arch in (("nat", args.nat_teacher, args.nat_arch), ("adv", args.adv_teacher, args.adv_arch)):
        spec = dict(plan[role])
        model = arch or spec.pop("model")
        spec.pop("model", None)
        if getattr(args, f"{role}_epochs"):
            spec["epochs"] = getattr(args, f"{role}_epochs")
        if given is None:
            t0 = time.perf_counter()
            given = str(run_stage(stage_config(args, plan, f"{role}_teacher", model=model, **spec), splits, args))
            timings[f"{role}_teacher_s"] = time.perf_counter() - t0
        teachers[role] = ModelConfig(model=model, checkpoint=given)

    student = dict(plan["student"])
    model = args.student or student.pop("model")
    student.pop("model", None)
    if args.epochs:
        student["epochs"] = args.epochs
    from multiteach.presets import get_preset

    need = get_preset(args.preset).teachers
    t0 = time.perf_counter()
    best = run_stage(stage_config(args, plan, args.preset, args.preset, model,
                                  teachers={k: v for k, v in teachers.items() if k in need}, **student), splits, args)
    timings["student_s"] = time.perf_counter() - t0
    if not DIST.is_main:
        return {}

    t0 = time.perf_counter()
    net = create_model(model, num_classes=splits.num_classes)
    load_weights(net, best)
    device = DIST.device(args.device)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    net.to(device)
    x, y = eval_tensors(splits, args.eval_n or plan["eval_n"])
    attacks = standard_attacks(EvalConfig().eps)
    if args.autoattack:
        attacks["autoattack"] = AutoAttack()
    if args.black_box:
        surrogate = create_model(teachers["adv"].model, num_classes=splits.num_classes)
        load_weights(surrogate, teachers["adv"].checkpoint)
        attacks.update(black_box_attacks(surrogate.to(device)))
    slow = {k: args.slow_n for k in ("autoattack", "transfer_pgd", "transfer_cw", "square")} if args.slow_n else None
    report = evaluate(net, x, y, attacks, device=device, subsets=slow)
    timings["eval_s"] = time.perf_counter() - t0
    report.meta.update(timings=timings, checkpoint=str(best), data=args.data_dir or "torchvision")
    console.print(report.table(f"{args.preset} student ({model})"))
    out = report.save_json(Path(args.run_dir) / "eval.json")
    try:
        from multiteach.plots import plot_run

        for f in plot_run(Path(args.run_dir) / args.preset):
            console.log(f"wrote {f}")
    except ImportError:
        console.log("matplotlib not installed: no plots (pip install 'multiteach[plot]')")
    console.log(f"wrote {out}; stage times {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return report.to_dict()


if __name__ == "__main__":
    main()
