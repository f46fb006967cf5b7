"""Every code block of README.md runs as written (with tiny models, toy data and files the test makes), or is
listed in SKIPPED with the reason it cannot run here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# Blocks that cannot run in a CPU test, by a line they hold, and why.
SKIPPED = {
    "python3 -m venv .venv": "installs packages (needs the network); the suite itself is what it runs",
    "bash benchmarks/reference.sh OUT_DIR": "the 9-minute GPU reference run; tests/test_example.py runs it in "
                                            "its tiny plan",
    "python examples/mtard_cifar.py --plan paper --data-dir DIR": "the paper's full protocol (hours on a GPU); "
                                                                  "tests/test_example.py checks its configs and "
                                                                  "runs the examples in their tiny mode",
    "torchrun --nproc_per_node 8 examples/mtard_cifar.py": "8 GPUs and 2 nodes; tests/test_distributed.py runs the "
                                                           "launch line with 2 gloo processes on the CPU",
    "#SBATCH --nodes=2": "a SLURM cluster",
}

# Tiny stand-ins: every model is a CIFAR ResNet-8, every attack 2 steps.
TINY_PYTHON = {"cifar_wrn34_10": "cifar_resnet8", "cifar_resnet56": "cifar_resnet8", "cifar_resnet18": "cifar_resnet8",
               "steps=10": "steps=2", "steps=20": "steps=2"}
TINY_RUN = ["train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=16", "train.progress=false",
            "data.val_size=32", "data.train_size=64", "train.eval_pgd_steps=1", "eval.batch_size=32"]
TINY_EVAL = ["--n", "8", "--slow-n", "4", "--queries", "20", "--batch-size", "8"]


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the README."""
    text = re.sub(r"^## Extending\n.*?(?=^## )", "", README.read_text(), flags=re.S | re.M)  # tests/test_extending.py
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def skip_reason(text: str) -> str | None:
    return next((why for line, why in SKIPPED.items() if line in text), None)


def blocks_of(kind: str) -> list[str]:
    """The runnable blocks: python, or bash that runs the `multiteach` command."""
    out = []
    for lang, text in code_blocks():
        if skip_reason(text):
            continue
        if kind == "python" and lang == "python":
            out.append(text)
        if kind == "multiteach" and lang == "bash" and re.search(r"^\s*(for .*; do )?multiteach ", text, re.M):
            out.append(text)
    return out


def test_every_block_is_run_or_skipped_with_a_reason():
    for lang, text in code_blocks():
        runs = text in blocks_of("python") + blocks_of("multiteach")
        assert runs or skip_reason(text), f"README block runs nowhere and is not in SKIPPED:\n{text}"
        assert lang in ("python", "bash"), f"README block of language {lang!r}:\n{text}"
    assert len(blocks_of("python")) == 1 and len(blocks_of("multiteach")) == 2
    for line in SKIPPED:  # a skip entry that no longer matches a block is stale
        assert any(line in text for _, text in code_blocks()), line


def test_the_python_blocks_run(tmp_path, monkeypatch):
    """'A recipe in a few lines', with tiny models and the teachers' checkpoints made here."""
    import multiteach as mt

    monkeypatch.chdir(tmp_path)
    for text in blocks_of("python"):
        for name, tiny in TINY_PYTHON.items():
            text = text.replace(name, tiny)
        for ckpt in re.findall(r'checkpoint="([^"]+)"', text):
            torch.save(mt.create_model("cifar_resnet8").state_dict(), ckpt)
        scope: dict = {}
        exec(compile(text, str(README), "exec"), scope)
        assert torch.isfinite(scope["out"].total)
        assert scope["x_adv"].shape == scope["x"].shape


def multiteach_calls(block: str, cwd: Path, data_dir: Path) -> list[list[str]]:
    """The `multiteach` commands a README bash block issues, in order (bash runs the block, with `multiteach`
    a function that records its arguments; DIR is the toy data folder)."""
    calls = cwd / "calls"
    calls.unlink(missing_ok=True)
    record = 'multiteach() { printf "%s\\x1f" "$@" >> "$CALLS"; printf "\\x1e" >> "$CALLS"; }\n'
    script = record + re.sub(r"\bDIR\b", str(data_dir), block)
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env={"CALLS": str(calls), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [c.split("\x1f")[:-1] for c in calls.read_text().split("\x1e")[:-1]]


def tiny(argv: list[str]) -> list[str]:
    """A README command made CPU-cheap: tiny models and runs in the configs it writes, few images in eval."""
    from multiteach.cli import preset_config

    if argv[0] == "config":
        d = preset_config(argv[1])
        sets = ["student.model=cifar_resnet8", *TINY_RUN]
        sets += [f"teachers.{role}.model=cifar_resnet8" for role in d["teachers"]]
        sets += ["options.steps=1"] if "steps" in d["options"] else []
        return argv + [f"--set={s}" for s in sets]
    if argv[0] == "eval":
        return argv + TINY_EVAL
    return argv


def run(argv: list[str]) -> None:
    from multiteach import cli

    code = cli.main(tiny(argv))
    assert code == 0, f"`multiteach {' '.join(argv)}` exited {code}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """DIR of the README: toy images as train.npz / test.npz."""
    from multiteach.data import synthetic

    d = tmp_path / "DIR"
    d.mkdir()
    for split, n, seed in (("train", 128, 0), ("test", 64, 1)):
        a = synthetic(n, seed=seed)
        np.savez(d / f"{split}.npz", x=a.x, y=a.y)
    return d


def test_the_multiteach_blocks_run(tmp_path, data_dir, monkeypatch):
    """The command from nothing to an MTARD student (teachers into the run directories the mtard config
    reads, then the student), then the command summary (presets, config, train, eval with AutoAttack and
    black-box rows, plot) beside those teachers; adv.pt of the summary is the adversarial teacher."""
    import importlib

    from multiteach.transforms import FGSM

    class QuickAutoAttack:  # standard AutoAttack takes minutes on a CPU (tests/test_evaluate.py runs it)
        def __init__(self, eps):
            self.fgsm = FGSM(eps)

        def __call__(self, model, x, y):
            return self.fgsm(model, x, y)

    monkeypatch.setattr(importlib.import_module("multiteach.evaluation"), "AutoAttack", QuickAutoAttack)
    summary, chain = blocks_of("multiteach")
    first, second = tmp_path / "chain", tmp_path / "summary"
    for cwd in (first, second):
        cwd.mkdir()
    monkeypatch.chdir(first)
    calls = multiteach_calls(chain, first, data_dir)
    assert [c[:2] for c in calls] == [["config", "natural"], ["config", "sat"], ["config", "mtard"],
                                      ["train", "nat.toml"], ["train", "adv.toml"], ["train", "mtard.toml"]]
    for argv in calls:
        run(argv)
    assert (first / "runs" / "mtard" / "best.pt").is_file()

    for teacher in ("nat_teacher", "adv_teacher"):
        shutil.copytree(first / "runs" / teacher, second / "runs" / teacher)
    shutil.copy(second / "runs" / "adv_teacher" / "best.pt", second / "adv.pt")
    monkeypatch.chdir(second)
    calls = multiteach_calls(summary, second, data_dir)
    assert [c[0] for c in calls] == ["presets", "config", "train", "eval", "plot"]
    for argv in calls:
        run(argv)
    report = (second / "runs" / "mtard" / "best.eval.json").read_text()
    assert "autoattack" in report and "square" in report.lower()
    assert (second / "runs" / "mtard" / "accuracy.png").is_file()
