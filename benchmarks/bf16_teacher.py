"""How far a teacher's outputs move in bf16: fp32 against bf16 autocast and against the bf16 BN-folded copy the
CUDA fast path builds for a frozen teacher (FastTeacher), on the first test images.

    python benchmarks/bf16_teacher.py --data-dir DIR cifar_airbench94=RUN/last.pt cifar_airbench=RUN2/last.pt

A whitening stem (``cifar_airbench94``) multiplies the raw pixels by large filters of opposite sign, where bf16
keeps 8 significant bits: this measures what that rounding does to the teacher's soft labels (KL from the fp32
ones, batch mean) and to its predictions (clean accuracy, argmax agreement). The CPU's bf16 is the same format
as the GPU's; the kernels differ.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from multiteach.build import eval_tensors, load_splits
from multiteach.config import DataConfig
from multiteach.fast import fold_batchnorm
from multiteach.teachers import load_model


def logits(model: torch.nn.Module, x: torch.Tensor, bf16: bool, batch: int = 500) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([model(b) for b in x.split(batch)]).float()  # autocast casts b for the bf16 copy too


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=2000, help="the first N test images (the library's order)")
    p.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    a = p.parse_args(argv)
    splits = load_splits(DataConfig(data_dir=a.data_dir, val_size=0))
    images, y = eval_tensors(splits, a.n)
    x = images.to("cpu")
    table = Table(title=f"fp32 against bf16, first {len(y):,} test images")
    results: dict[str, dict[str, float]] = {}
    for col in ("model", "clean fp32", "clean autocast", "KL", "agree %", "clean bf16 copy", "KL", "agree %"):
        table.add_column(col)
    for spec in a.models:
        name, _, checkpoint = spec.partition("=")
        model = load_model(name, checkpoint, splits.num_classes).eval()
        ref = logits(model, x, bf16=False)
        auto = logits(model, x, bf16=True)
        copy = logits(fold_batchnorm(model).to(torch.bfloat16), x, bf16=True)
        r = results[name] = {"clean_fp32": (ref.argmax(1) == y).float().mean().item()}
        for key, out in (("autocast", auto), ("copy", copy)):
            kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
            r.update({f"clean_{key}": (out.argmax(1) == y).float().mean().item(), f"kl_{key}": kl.item(),
                      f"agree_{key}": (out.argmax(1) == ref.argmax(1)).float().mean().item()})
        table.add_row(name, *(f"{r[k]:.1e}" if k.startswith("kl") else f"{100 * r[k]:.2f}" for k in r))
    Console(width=120).print(table)
    return results


if __name__ == "__main__":
    main()
