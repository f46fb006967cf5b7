"""Figures of a run from its ``metrics.jsonl``: L_i(t) and w_i(t) (the paper's Fig. 3) and accuracy curves.

Needs matplotlib (``pip install 'multiteach[plot]'``).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[str], list[dict], list[dict]]:
    """(branch names, step records, epoch records) of a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl: is it a multiteach run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write (the next resume drops it)
            continue
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    names: list[str] = []
    if (run_dir / "run.json").is_file():
        names = json.loads((run_dir / "run.json").read_text()).get("branches", [])
    n = len(steps[0]["L"]) if steps else 0
    names = names if len(names) == n else [f"branch{i}" for i in range(n)]
    return names, steps, epochs


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write losses.png, weights.png (with the teachers' temperatures where a balance moved them) and
    accuracy.png (when validated); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names, steps, epochs = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not steps:
        raise ValueError(f"{str(run_dir)!r} has no training steps logged yet")
    t = [r["step"] for r in steps]
    written = []
    for key, ylabel, fname in (("L", "loss $L_i(t)$", "losses.png"), ("w", "weight $w_i(t)$", "weights.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, name in enumerate(names):
            ax.plot(t, [r[key][i] for r in steps], label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "L":
            ax.set_yscale("log")
        handles, labels = ax.get_legend_handles_labels()
        temps = [r for r in epochs if "T" in r]
        if key == "w" and temps:  # B-MTARD's temperatures, at each epoch's last step, on their own axis
            last = {r["epoch"]: r["step"] for r in steps}
            tx = ax.twinx()
            for name in temps[0]["T"]:  # each in its branch's colour
                tx.plot([last.get(r["epoch"], 0) for r in temps], [r["T"][name] for r in temps], ls="--",
                        marker=".", color=f"C{names.index(name) if name in names else len(names)}",
                        label=f"$T$ {name}")
            tx.set_ylabel("teacher temperature $T_i$")
            more = tx.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(Path(run_dir).resolve().name, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    val = [r for r in epochs if "val_clean" in r]
    if val:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        e = [r["epoch"] for r in val]
        pgd = f"PGD-{_eval_pgd_steps(run_dir)}"
        for i, (key, label) in enumerate((("clean", "clean"), ("robust", pgd), ("w_robust", "W-Robust"))):
            if f"val_{key}" not in val[0]:  # selected on clean accuracy: no attack was run
                continue
            ax.plot(e, [100 * r[f"val_{key}"] for r in val], marker="o", ms=3, label=label, color=f"C{i}")
            if f"val_ema_{key}" in val[0]:  # the EMA weights, validated beside the raw ones
                ax.plot(e, [100 * r[f"val_ema_{key}"] for r in val], ls="--", marker="x", ms=3, color=f"C{i}",
                        label=f"{label} (EMA)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7, ncol=2, loc="best")
        ax.grid(alpha=0.3)
        ax.set_title(Path(run_dir).resolve().name, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
        written.append(out / "accuracy.png")
    return written


def _eval_pgd_steps(run_dir: str | Path) -> int:
    info = Path(run_dir) / "run.json"
    if info.is_file():
        return int(json.loads(info.read_text()).get("train", {}).get("eval_pgd_steps", 20))
    return 20


__all__ = ["plot_run", "read_metrics"]
