"""A timm student distilled from three pretrained timm teachers on your own images (an ImageFolder), no attacks.

    python examples/pretrained_teachers.py --data-dir DIR                 # DIR/train/<class>/*, DIR/val/<class>/*
    python examples/pretrained_teachers.py --data-dir DIR --teachers resnet50.a1_in1k convnext_tiny.fb_in1k \\
        efficientnet_b0.ra_in1k --student resnet18 --methods ca_mkd avg_kd
    python examples/pretrained_teachers.py --data-dir DIR --teachers NAME=weights.pth ...   # local weight files

Stages: each teacher starts from its ImageNet weights (timm downloads them on first use, into the Hugging Face /
torch hub cache; ``NAME=FILE`` reads a local file instead) and is fine-tuned on the data with a new head
(preset ``natural``, cached by recipe and seed); then one student per method (``ca_mkd``, ``avg_kd``, ``ebkd``:
any generic multi-teacher preset) learns from the three, each teacher behind its own normalisation and resized
to the size its weights take, so the student and every teacher read the same [0, 1] images. The last lines are
a table of clean accuracy on DIR/val for every student and teacher. Models are selected on a split held out of
DIR/train, never on DIR/val.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from multiteach.build import build_model, eval_tensors, load_splits
from multiteach.config import DataConfig, ModelConfig
from multiteach.evaluation import accuracy_table, correct_mask
from multiteach.pipeline import run_command, stage_config, train_cached, train_stage
from multiteach.runtime import resolve_device

console = Console(stderr=True)

TEACHERS = ["resnet50.a1_in1k", "convnext_tiny.fb_in1k", "efficientnet_b0.ra_in1k"]
METHODS = ("ca_mkd", "avg_kd", "ebkd")
FULL = {"student": "resnet18", "epochs": 30, "teacher_epochs": 5, "image_size": 224, "val_size": 1000,
        "train": dict(batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1)}
TINY = {"student": "test_resnet", "epochs": 1, "teacher_epochs": 1, "image_size": 32, "val_size": 6,
        "train": dict(batch_size=8, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant", steps_per_epoch=2)}


def teacher_table(spec: str, checkpoint: str | None = None) -> ModelConfig:
    """``NAME`` (timm downloads its weights) or ``NAME=FILE`` (a local weights file), resized to its size."""
    name, _, weights = spec.partition("=")
    return ModelConfig(model=name, checkpoint=checkpoint, pretrained=not weights, weights=weights or None,
                       resize=True)


def stage_train(plan: dict, epochs: int, args: argparse.Namespace) -> dict:
    return dict(plan["train"], epochs=epochs, milestones=[], select="clean", eval_pgd_steps=1, seed=args.seed,
                device=args.device, precision=args.precision, progress=not args.quiet)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="an ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*")
    p.add_argument("--teachers", nargs=3, metavar="NAME[=FILE]", help=f"timm names (default {' '.join(TEACHERS)})")
    p.add_argument("--student", help="the student's timm name (default resnet18, from scratch)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="generic multi-teacher presets to compare")
    p.add_argument("--image-size", type=int, help="training resolution (default 224)")
    p.add_argument("--epochs", type=int, help="student epochs (default 30)")
    p.add_argument("--teacher-epochs", type=int, help="fine-tuning epochs of each teacher (default 5)")
    p.add_argument("--run-dir", default="runs/pretrained_teachers", help="one folder per student")
    p.add_argument("--workers", type=int, help="data-loading processes (default: min(8, CPUs))")
    p.add_argument("--eval-n", type=int, help="evaluate on the first n images of DIR/val (default: all)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 32 px, two steps per stage")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    plan = TINY if args.tiny else FULL
    data = DataConfig(dataset="imagefolder", data_dir=args.data_dir, image_size=args.image_size or plan["image_size"],
                      val_size=plan["val_size"], workers=args.workers, seed=args.seed)
    splits = load_splits(data)
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()

    teachers: dict[str, ModelConfig] = {}
    for role, spec in zip(("t1", "t2", "t3"), args.teachers or TEACHERS):  # fine-tuned once, cached
        cfg = stage_config("natural", teacher_table(spec), data, "unused",  # from its pretrained weights, with
                           **stage_train(plan, args.teacher_epochs or plan["teacher_epochs"], args))  # a new head
        teachers[role] = teacher_table(spec, str(train_cached(cfg, run_dir / "teachers", splits, console=console)))
    students = {}
    student = args.student or plan["student"]
    for method in args.methods:  # the same student, teachers and schedule; only the recipe differs
        cfg = stage_config(method, student, data, run_dir / method, teachers=teachers,
                           **stage_train(plan, args.epochs or plan["epochs"], args))
        students[method] = train_stage(cfg, splits, console=console)

    device = resolve_device(args.device)
    x, y = eval_tensors(splits, args.eval_n, workers=args.workers)
    models = {f"{m} student ({student})": ModelConfig(model=student, checkpoint=str(best))
              for m, best in students.items()}
    models.update({f"{role} teacher ({t.model})": t for role, t in teachers.items()})
    rows = {}
    for name, table in models.items():
        net = build_model(table, splits.num_classes, name).to(device)
        rows[name] = correct_mask(net, x, y, None, 64, device).float().mean().item()
    table = accuracy_table(rows, f"Clean accuracy on {args.data_dir}/val, n = {len(y)}",
                           f"{time.perf_counter() - t0:.0f} s")
    Console(width=120).print(table)  # last: logs and the device tool show the end of the output
    return rows


if __name__ == "__main__":
    run_command(main)
