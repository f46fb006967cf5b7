"""Multi-teacher KD without attacks: one student, three teachers of different architectures, three ways to weigh
them (CA-MKD, AVER, EBKD), on CIFAR-100.

    python examples/ensemble_kd.py --download                       # torchvision's CIFAR-100 under --root
    python examples/ensemble_kd.py --data-dir DIR                   # DIR/train.npz, DIR/test.npz (x uint8 NHWC, y)
    python examples/ensemble_kd.py --data-dir DIR --epochs 60 --teacher-epochs 60   # a shorter schedule
    python examples/ensemble_kd.py --tiny                           # CPU smoke run on synthetic images

Stages: the three teachers (WRN-16-4, ResNet-20, MobileNetV2; preset ``natural``), trained once into a cache
keyed by recipe and seed (``--teacher-cache``), then one student (ResNet-8) per method, then a table of the clean
test accuracy of every student and teacher, printed last. The schedule is the one Rorozhl/CA-MKD and
RepDistiller train teachers and students with: SGD, momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 (0.01 for
MobileNetV2), 240 epochs with the LR x0.1 at 150, 180 and 210 (``--epochs`` / ``--teacher-epochs`` shorten it,
the milestones scaled alike). Models are selected on a held-out validation split, never on the test set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from multiteach.build import Splits, eval_tensors, load_splits
from multiteach.config import DataConfig
from multiteach.data import split_validation, synthetic
from multiteach.evaluation import accuracy_table, correct_mask
from multiteach.pipeline import run_command, stage_config, train_cached, train_stage
from multiteach.runtime import resolve_device
from multiteach.teachers import load_model

console = Console(stderr=True)

TEACHERS = {"t1": "cifar_wrn16_4", "t2": "cifar_resnet20", "t3": "cifar_mobilenetv2"}
METHODS = ("ca_mkd", "avg_kd", "ebkd")
FULL = {
    "student": "cifar_resnet8", "epochs": 240, "teacher_epochs": 240,
    "train": dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="piecewise"),
    "val_size": 5000, "train_size": None, "eval_n": None,
}
TINY = {  # two steps of each stage on 16-px synthetic images (10 classes): the pipeline's plumbing, on the CPU
    "student": "cifar_resnet8", "epochs": 1, "teacher_epochs": 1,
    "train": dict(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="constant", steps_per_epoch=2),
    "val_size": 32, "train_size": 128, "eval_n": 64,
}
MILESTONES = (150, 180, 210)  # of 240 epochs
SMALL_LR = ("mobilenetv2", "shufflenet")  # RepDistiller trains these at lr 0.01


def stage_train(plan: dict, model: str, epochs: int, args: argparse.Namespace, nesterov: bool) -> dict:
    """TrainConfig fields of one stage: the plan's, lr 0.01 for MobileNet/ShuffleNet, milestones scaled."""
    train = dict(plan["train"], epochs=epochs, milestones=sorted({max(1, round(m * epochs / 240)) for m in MILESTONES}),
                 nesterov=nesterov, select="clean", eval_pgd_steps=1, seed=args.seed, device=args.device,
                 precision=args.precision, progress=not args.quiet)
    if any(s in model for s in SMALL_LR):
        train["lr"] = 0.01
    if args.tiny:
        train["milestones"] = []
    return train


def tiny_splits(plan: dict, seed: int) -> Splits:
    """Synthetic 16-px images of 10 classes (the models pool adaptively): train, validation and test."""
    train, val = split_validation(synthetic(plan["train_size"] + plan["val_size"], size=16, seed=seed),
                                  plan["val_size"], seed)
    return Splits(train, val, synthetic(plan["eval_n"], size=16, seed=seed + 1), num_classes=10)


def accuracy(model_name: str, checkpoint: Path | str, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             device: torch.device) -> float:
    net = load_model(model_name, checkpoint, num_classes).to(device)
    return correct_mask(net, x, y, None, 500, device).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with train.npz / test.npz")
    p.add_argument("--download", action="store_true", help="download the dataset through torchvision")
    p.add_argument("--root", default="data", help="torchvision data folder")
    p.add_argument("--dataset", default="cifar100", help="cifar100 (default), cifar10 or a registered dataset")
    p.add_argument("--run-dir", default="runs/ensemble_kd", help="one folder per student")
    p.add_argument("--teacher-cache", help="teachers trained once, reused (default: 'teachers' in --run-dir)")
    p.add_argument("--student", help="student timm name (default cifar_resnet8)")
    p.add_argument("--teachers", nargs=3, metavar=("T1", "T2", "T3"), help="the three teachers' timm names")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="presets to compare (default: "
                                                                        f"{' '.join(METHODS)})")
    p.add_argument("--epochs", type=int, help="student epochs (default 240)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default 240)")
    p.add_argument("--eval-n", type=int, help="evaluate on the first n test images (default: all)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: synthetic images, a few steps per stage")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.tiny or args.data_dir or args.download):
        raise ValueError("give --data-dir (train.npz/test.npz), --download (torchvision) or --tiny (synthetic)")
    plan = TINY if args.tiny else FULL
    data = DataConfig(dataset="cifar10" if args.tiny else args.dataset, data_dir=None if args.tiny else args.data_dir,
                      download=args.download and not args.tiny, root=args.root, val_size=plan["val_size"],
                      train_size=plan["train_size"], seed=args.seed)  # tiny: what the teacher cache is keyed by
    splits = tiny_splits(plan, args.seed) if args.tiny else load_splits(data)
    run_dir = Path(args.run_dir)
    cache = Path(args.teacher_cache) if args.teacher_cache else run_dir / "teachers"
    archs = dict(zip(TEACHERS, args.teachers)) if args.teachers else dict(TEACHERS)
    student = args.student or plan["student"]
    t0 = time.perf_counter()

    teachers = {}
    for role, arch in archs.items():  # natural training, cached: a second run (or another example) reuses them
        cfg = stage_config("natural", arch, data, "unused",
                           **stage_train(plan, arch, args.teacher_epochs or plan["teacher_epochs"], args, False))
        teachers[role] = (arch, str(train_cached(cfg, cache, splits, console=console)))
    students = {}
    for method in args.methods:  # the same student, teachers and schedule; only the recipe differs
        cfg = stage_config(method, student, data, run_dir / method, teachers=teachers,
                           **stage_train(plan, student, args.epochs or plan["epochs"], args, True))
        students[method] = train_stage(cfg, splits, console=console)

    device = resolve_device(args.device)
    x, y = eval_tensors(splits, args.eval_n or plan["eval_n"])
    rows = {f"{m} student ({student})": accuracy(student, best, x, y, splits.num_classes, device)
            for m, best in students.items()}
    rows.update({f"{role} teacher ({arch})": accuracy(arch, ckpt, x, y, splits.num_classes, device)
                 for role, (arch, ckpt) in teachers.items()})
    where = "synthetic" if args.tiny else args.dataset
    table = accuracy_table(rows, f"Clean test accuracy, n = {len(y)} ({where})", f"{time.perf_counter() - t0:.0f} s")
    Console(width=120).print(table)  # last: logs and the device tool show the end of the output
    return rows


if __name__ == "__main__":
    run_command(main)
