"""The `multiteach` command, run as a user runs it: in a subprocess, reading its exit code and stderr."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multiteach.cli import one_line, preset_config
from multiteach.config import ExperimentConfig, read_config, to_toml
from multiteach.data import synthetic
from multiteach.presets import PRESETS

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiteach.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


def small_config(tmp_path: Path, name: str = "run", **train) -> Path:
    d = preset_config("natural")
    d["student"]["model"] = "cifar_resnet8"
    d["options"] = {}
    d["data"].update(train_size=384, val_size=64)
    d["train"].update({"epochs": 2, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "milestones": [],
                       "progress": False, "log_every": 2, **train})
    d["run_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(d))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    r = cli("train", str(small_config(tmp)), "--synthetic")
    assert r.returncode == 0, r.stderr
    return tmp / "run"


def test_every_preset_writes_a_config_that_validates(tmp_path):
    for name in PRESETS:
        d = preset_config(name)
        for t in d["teachers"].values():  # the written paths are placeholders to fill in
            t["checkpoint"] = None
        (tmp_path / f"{name}.toml").write_text(to_toml(d))
        cfg = ExperimentConfig.model_validate(read_config(tmp_path / f"{name}.toml"))
        assert cfg.preset == name and cfg.train.epochs == PRESETS[name].schedule["epochs"]
        # every official setting is the preset's own (natural's clean selection is natural's only)
        assert cfg.train.select == PRESETS[name].schedule.get("select", "w_robust")
        assert cfg.train.milestones == list(PRESETS[name].schedule.get("milestones", [215, 260, 285]))
    r = cli("config", "mtard", "-o", str(tmp_path / "m.toml"))
    assert r.returncode == 0
    text = (tmp_path / "m.toml").read_text()
    assert 'preset = "mtard"' in text and "rw = 0.025" in text and "[teachers.adv]" in text
    short = preset_config("mtard", ["train.epochs=100"])  # the preset's shape at the user's epochs
    assert (short["train"]["epochs"], short["train"]["milestones"]) == (100, [72, 87, 95])
    with pytest.raises(ValueError, match="train.lrr: unknown setting \\(did you mean 'lr'\\?\\)"):
        try:
            preset_config("mtard", ["train.lrr=1"])
        except ValueError as e:  # as the CLI prints it
            raise ValueError(one_line(e)) from None
    with pytest.raises(ValueError, match="stepz: not an option of preset 'mtard'"):
        preset_config("mtard", ["options.stepz=1"])


def test_presets_lists_each_with_its_description():
    r = cli("presets")
    assert r.returncode == 0
    for name in PRESETS:
        assert name in r.stdout


BAD = [
    # (what, command-line arguments after the config, part of the one-line message)
    ("unknown preset", ["--set", "preset=nope"], "unknown preset 'nope'"),
    ("unknown model", ["--set", "student.model=resnet_nope"], "unknown model 'resnet_nope'"),
    ("unknown weighter", ["--set", "preset=mtard", "--set", "teachers.adv.model=cifar_resnet8",
      "--set", "teachers.nat.model=cifar_resnet8", "--set", "options.weighter=nope"], "unknown weighter 'nope'"),
    ("negative beta", ["--set", "preset=mtard", "--set", "teachers.adv.model=cifar_resnet8",
      "--set", "teachers.nat.model=cifar_resnet8", "--set", "options.beta=-1"], "ANL beta must be >= 0"),
    ("r_w outside (0, 1]", ["--set", "preset=mtard", "--set", "teachers.adv.model=cifar_resnet8",
      "--set", "teachers.nat.model=cifar_resnet8", "--set", "options.rw=2"], "ANL rate r_w must be in (0, 1]"),
    ("negative eps", ["--set", "preset=sat", "--set", "options.eps=-0.1"], "eps must be >= 0"),
    ("zero steps", ["--set", "preset=sat", "--set", "options.steps=0"], "steps must be >= 1"),
    ("negative lr", ["--set", "train.lr=-0.1"], "train.lr: Input should be greater than 0"),
    ("wrong type", ["--set", "train.epochs=many"], "train.epochs: Input should be a valid integer"),
    ("missing data directory", ["--set", "data.data_dir=/no/such/dir"], "data_dir '/no/such/dir' does not exist"),
    ("CUDA on a CPU machine", ["--set", "train.device=cuda"], "no usable CUDA GPU"),
    ("unknown key", ["--set", "train.lrr=0.1"], "train.lrr: unknown setting (did you mean 'lr'?)"),
    ("unknown preset option", ["--set", "options.betta=1"], "preset 'natural': options.betta: Unexpected keyword"),
]


@pytest.mark.parametrize("what,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, what, args, message):
    """In-process (``cli.main``, the function the command runs; the subprocess path is covered by the tests
    below): a fresh interpreter per case would cost ~5 s of imports each."""
    r = run_inprocess(capsys, "train", str(small_config(tmp_path)), "--synthetic", *args)
    code, err = r.returncode, r.stderr
    assert code == 2, (what, err)
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def run_inprocess(capsys, *args: str) -> subprocess.CompletedProcess:
    """``cli.main`` in this process, as a CompletedProcess (no interpreter start-up: ~5 s of imports each)."""
    from multiteach import cli as command

    code = command.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def test_teacher_problems_are_named(tmp_path, trained, capsys):
    cfg = small_config(tmp_path)
    mtard = ["--set", "preset=mtard", "--set", "teachers.adv.model=cifar_resnet8",
             "--set", "teachers.nat.model=cifar_resnet8"]
    missing = run_inprocess(capsys, "train", str(cfg), "--synthetic", "--set", "preset=mtard")
    assert missing.returncode == 2 and "needs teacher(s) adv, nat" in missing.stderr
    gone = run_inprocess(capsys, "train", str(cfg), "--synthetic", *mtard,
                         "--set", "teachers.adv.checkpoint=/no/adv.pt", "--set", "teachers.nat.checkpoint=/no/nat.pt")
    assert gone.returncode == 2 and "checkpoint '/no/adv.pt' not found" in gone.stderr
    ckpt = str(trained / "best.pt")
    arch = run_inprocess(capsys, "train", str(cfg), "--synthetic", "--set", "preset=mtard",
                         "--set", "teachers.adv.model=cifar_resnet20", "--set", f"teachers.adv.checkpoint={ckpt}",
                         "--set", "teachers.nat.model=cifar_resnet8", "--set", f"teachers.nat.checkpoint={ckpt}")
    assert arch.returncode == 2 and "does not fit" in arch.stderr and "another architecture" in arch.stderr
    classes = run_inprocess(capsys, "train", str(cfg), "--synthetic", *mtard,
                            "--set", f"teachers.adv.checkpoint={ckpt}", "--set", f"teachers.nat.checkpoint={ckpt}",
                            "--set", "data.dataset=cifar100")
    assert classes.returncode == 2 and "has 10 classes (fc.weight), the data 100" in classes.stderr, classes.stderr


def test_eval_prints_the_table_and_refuses_bad_checkpoints(tmp_path, trained, capsys):
    r = cli("eval", str(trained / "best.pt"), "--synthetic", "--n", "64", "--attacks", "fgsm", "pgd_sat",
            "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert "pgd_sat" in r.stdout and "worst case" in r.stdout and (tmp_path / "e.json").is_file()
    assert "(fp32, eval mode)" in r.stdout and json.loads((tmp_path / "e.json").read_text())["meta"]["tf32"] is False
    wrong = run_inprocess(capsys, "eval", str(trained / "best.pt"), "--synthetic", "--model", "cifar_resnet18",
                          "--n", "8")
    assert wrong.returncode == 2 and "does not fit" in wrong.stderr
    torch.save({"student": {}, "hook": os.getcwd}, tmp_path / "evil.pt")  # a pickled callable
    evil = run_inprocess(capsys, "eval", str(tmp_path / "evil.pt"), "--synthetic", "--model", "cifar_resnet8")
    assert evil.returncode == 2 and "refused (weights_only=True)" in evil.stderr
    unknown = run_inprocess(capsys, "eval", str(trained / "best.pt"), "--synthetic", "--attacks", "nope")
    assert unknown.returncode == 2 and "unknown attack 'nope': choose one of" in unknown.stderr
    (tmp_path / "notes.pt").write_text("hello\n")  # not a torch file at all
    text = run_inprocess(capsys, "eval", str(tmp_path / "notes.pt"), "--synthetic", "--model", "cifar_resnet8")
    assert text.returncode == 2 and "cannot be read (KeyError" in text.stderr and "torch.save file" in text.stderr
    pixels = run_inprocess(capsys, "eval", str(trained / "best.pt"), "--synthetic", "--eps", "8", "--n", "8")
    assert pixels.returncode == 2 and "did you mean 8/255" in pixels.stderr

    # without --dataset / --data-dir: the test split of the data the checkpoint records, if that folder is here
    data = tmp_path / "npz"
    data.mkdir()
    for split, n in (("train", 32), ("test", 24)):
        a = synthetic(n, seed=int(split == "test"))
        np.savez(data / f"{split}.npz", x=a.x, y=a.y)
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["experiment"]["config"]["data"].update(dataset="npz", data_dir=str(data))
    ckpt["experiment"]["config"]["eval"].update(attacks=["fgsm", {"name": "pgd", "steps": 2}], n=16)  # its table
    torch.save(ckpt, tmp_path / "moved.pt")
    recorded = run_inprocess(capsys, "eval", str(tmp_path / "moved.pt"), "--out", str(tmp_path / "m.json"))
    assert recorded.returncode == 0, recorded.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    assert (report["meta"]["dataset"], report["meta"]["data"]) == ("npz", str(data))
    assert report["n"] == 16 and [r["attack"] for r in report["rows"]] == ["fgsm", "pgd(steps=2)"]
    flags = run_inprocess(capsys, "eval", str(tmp_path / "moved.pt"), "--n", "8", "--attacks", "fgsm",
                          "--out", str(tmp_path / "f.json"))  # flags over the recorded table
    assert flags.returncode == 0 and json.loads((tmp_path / "f.json").read_text())["n"] == 8


def test_plot_writes_non_empty_pngs(tmp_path, trained):
    r = cli("plot", str(trained), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for name in ("losses.png", "weights.png", "accuracy.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert cli("plot", str(tmp_path / "nowhere")).returncode == 2


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A pre-empted node: SIGTERM during epoch 2 writes a checkpoint (exit 3); the same command finishes the
    run with the same final weights as a run never interrupted."""
    whole = small_config(tmp_path, "whole", epochs=3, log_every=1)
    assert cli("train", str(whole), "--synthetic").returncode == 0
    cut = small_config(tmp_path, "cut", epochs=3, log_every=1)
    cmd = [sys.executable, "-m", "multiteach.cli", "train", str(cut), "--synthetic"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or '"epoch": 2' not in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "run the same command again to resume" in err
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] < 3
    again = cli("train", str(cut), "--synthetic")
    assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["student"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["student"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _unset_fields(cfg: dict, model, prefix: str = "") -> list[tuple[str, str, str]]:
    """(table, key, description) of every None-valued field of a config dict, through nested models."""
    from pydantic import BaseModel

    out = []
    for key, value in cfg.items():
        info = model.model_fields.get(key) if model is not None else None
        if value is None:
            out.append((prefix, key, " ".join((info.description or "").split()) if info else ""))
        elif isinstance(value, dict) and info is not None:
            sub = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) \
                else None
            if sub is not None:
                out += _unset_fields(value, sub, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_writes_every_field_and_reads_back_equal(tmp_path, monkeypatch, capsys, preset):
    """`multiteach config PRESET` (tomlkit): fields that are None are written commented out with their
    description; the file reads back (tomllib) into the same, valid ExperimentConfig."""
    import tomllib

    from multiteach import cli as cli_module

    monkeypatch.chdir(tmp_path)
    expected = preset_config(preset)
    for t in expected["teachers"].values():  # the teachers' checkpoints the written config points at
        if t["checkpoint"] is None:  # an online peer starts from scratch
            continue
        Path(t["checkpoint"]).parent.mkdir(parents=True, exist_ok=True)
        Path(t["checkpoint"]).write_bytes(b"")
    assert cli_module.main(["config", preset, "-o", "c.toml"]) == 0
    text = Path("c.toml").read_text()
    back = ExperimentConfig.model_validate(tomllib.loads(text))
    assert back == ExperimentConfig.model_validate(expected)
    assert back.model_dump(mode="json") == ExperimentConfig.model_validate(expected).model_dump(mode="json")
    unset = _unset_fields(back.model_dump(mode="json"), ExperimentConfig)
    assert {k for _, k, _ in unset} >= {"data_dir", "train_size", "steps_per_epoch", "time_budget_s"}
    lines = text.splitlines()
    for table, key, desc in unset:
        section = lines.index(f"[{table.rstrip('.')}]") if table else 0
        commented = next(line for line in lines[section:] if line.startswith(f"# {key} = "))
        assert "# unset" in commented and desc in commented, (key, commented)


def test_help_imports_neither_torch_nor_timm():
    """`multiteach --help` and `multiteach train --help` parse before anything heavy is imported (the package's
    names load on first use), so they answer at once."""
    code = """
import sys
from multiteach import cli
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["config", "--help"], ["train"]):
    try:
        cli.main(argv)
    except SystemExit as e:
        print("exit", e.code, file=sys.stderr)
print(sorted(m for m in ("torch", "timm", "numpy", "pydantic", "multiteach.build", "multiteach.trainer",
                         "multiteach.config") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]
    assert r.stderr.count("exit 0") == 4 and "exit 2" in r.stderr  # `train` without its config: a usage error
    assert "--restart" in r.stdout and "--autoattack" in r.stdout
