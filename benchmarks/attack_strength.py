"""How strong is each few-step training attack? Robust accuracy and CE it leaves on an adversarially trained net.

    python benchmarks/attack_strength.py --data-dir DIR          # CPU: ~6 minutes on 2 cores (ResNet-8)
    python benchmarks/attack_strength.py --data-dir DIR --model cifar_resnet18 --train-n 49000 --epochs 10  # GPU

A budgeted run trains with PGD-5 where the papers use PGD-10; this measures what a step size and a start
cost in attack strength. A 5-step attack of 2/255 from a uniform start in the 8/255 ball travels 10/255 per
pixel: pixels that start on the wrong side cannot reach the boundary, so it is weaker than the same steps from
x (the official MTARD start) and than Madry's 2.5 eps / steps rule (4/255). The net is first trained
adversarially (PGD-3, step 4/255, uniform start, one-cycle LR), since a natural net falls to any attack; each
attack then runs from ``--seeds`` seeds on the first ``--test-n`` test images, in eval mode and strict fp32
(TF32 off on a GPU). "At eps": the share of pixels whose perturbation reached the ball's edge (pixels held
at 0 or 1 by the image range count as short).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import multiteach.models  # noqa: F401  (registers the CIFAR models in timm)
from multiteach import PGD
from multiteach.build import eval_tensors, load_splits
from multiteach.config import DataConfig
from multiteach.data import TensorLoader
from multiteach.runtime import tf32

EPS = 8 / 255
ATTACKS = {  # name -> (steps, step size, start)
    "PGD-5, 2/255, uniform start": (5, 2 / 255, "uniform"),
    "PGD-5, 2/255, x + 0.001 N (MTARD's start)": (5, 2 / 255, "normal"),
    "PGD-5, 3.2/255, uniform start (reaches 2 eps)": (5, 3.2 / 255, "uniform"),
    "PGD-5, 4/255, uniform start (2.5 eps / 5)": (5, 4 / 255, "uniform"),
    "PGD-10, 2/255, x + 0.001 N (official MTARD)": (10, 2 / 255, "normal"),
    "PGD-20, 2/255, uniform start (evaluation)": (20, 2 / 255, "uniform"),
}


def train(net: torch.nn.Module, loader: TensorLoader, epochs: int, console: Console) -> None:
    """Adversarial training, short: PGD-3 (step 4/255, uniform start), SGD Nesterov, one-cycle LR 0.1."""
    attack = PGD(EPS, 4 / 255, 3, start="uniform", bn_mode="eval")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * len(loader))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for x, y in loader:
            loss = F.cross_entropy(net(attack(net, x, y)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        console.log(f"epoch {epoch + 1}: adversarial CE {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with train.npz / test.npz")
    p.add_argument("--model", default="cifar_resnet8")
    p.add_argument("--train-n", type=int, default=12000, help="training images (a random subset)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--test-n", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3, help="random starts averaged per attack")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    console = Console(stderr=True)
    torch.manual_seed(0)
    splits = load_splits(DataConfig(data_dir=a.data_dir, val_size=0, train_size=a.train_n))
    loader = TensorLoader(splits.train, 128, shuffle=True, augment=True, drop_last=True, device=a.device)
    net = timm.create_model(a.model, num_classes=splits.num_classes).to(a.device)
    with tf32(False):  # figures in strict fp32 (cuDNN's TF32 default off)
        return measure(net, loader, splits, a, console)


def measure(net: torch.nn.Module, loader: TensorLoader, splits: Any, a: argparse.Namespace,
            console: Console) -> dict[str, dict[str, float]]:
    """Train ``net`` adversarially, then each attack's robust accuracy, CE and share of pixels at eps."""
    train(net, loader, a.epochs, console)
    net.eval()
    x, y = eval_tensors(splits, a.test_n)
    x, y = x.to(a.device), y.to(a.device)

    def scores(inputs: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            out = net(inputs)
        return (out.argmax(1) == y).float().mean().item(), F.cross_entropy(out, y).item()

    clean, _ = scores(x)
    table = Table(title=f"{a.model}, adversarially trained ({a.epochs} epochs, {a.train_n} images): clean "
                        f"{100 * clean:.2f}%, {a.test_n} test images, eps 8/255, mean of {a.seeds} starts")
    for col in ("attack", "robust %", "CE", "pixels at eps %"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    results = {}
    for name, (steps, alpha, start) in ATTACKS.items():
        runs = []
        for seed in range(a.seeds):
            torch.manual_seed(seed)
            adv = PGD(EPS, alpha, steps, start=start)(net, x, y)
            runs.append((*scores(adv), ((adv - x).abs() > EPS - 1e-4).float().mean().item()))
        acc, ce, edge = np.mean(runs, axis=0)
        results[name] = {"robust": acc, "ce": ce, "at_eps": edge}
        table.add_row(name, f"{100 * acc:.2f}", f"{ce:.4f}", f"{100 * edge:.1f}")
    Console().print(table)
    return results


if __name__ == "__main__":
    main()
