"""Faults that must not lose or corrupt work: a second process on a busy run_dir, a torn metrics line,
an old log under a fresh start, stale checkpoint temp files, non-finite weights."""

import json
import os
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import multiteach as mt
from multiteach import build, config
from multiteach.checkpoint import CheckpointError, load_weights
from multiteach.cli import one_line
from multiteach.data import TensorLoader, synthetic
from multiteach.engine.checkpointer import ConfigMismatchError
from multiteach.pipeline import check_run_dir, stage_config, train_stage
from multiteach.rundir import LOCK, RunDirBusyError, RunLock
from tests.conftest import tiny_net


def _trainer(run_dir, epochs=1, seed=0):
    torch.manual_seed(seed)
    loader = TensorLoader(synthetic(64, seed=0), 16, shuffle=True, augment=True, drop_last=True, seed=0)
    cfg = mt.TrainConfig(epochs=epochs, batch_size=16, lr=0.05, milestones=[], log_every=1, progress=False,
                         eval_every=0)
    return mt.Trainer(mt.presets.natural(tiny_net()), loader, cfg, run_dir=run_dir)


def _steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["type"] == "step"]


def test_a_busy_run_dir_is_refused_naming_its_holder_and_a_dead_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from multiteach.rundir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError) as err:
            _trainer(run_dir).fit()
        msg = one_line(err.value)
        assert f"process {holder.pid}" in msg and "another run_dir" in msg
        assert not (run_dir / "last.pt").exists()  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the run proceeds, then releases it
    assert (run_dir / LOCK).is_file()
    res = _trainer(run_dir).fit()
    assert res.status == "finished" and not (run_dir / LOCK).exists()


def test_two_processes_that_find_the_same_stale_lock_do_not_both_take_it(tmp_path, monkeypatch):
    """B finds a dead process's lock; before B removes it, A (another live process of this host) takes it over.
    B must then see A's lock and be refused, not remove it and train beside A."""
    from multiteach import rundir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.me = {"pid": os.getppid(), "host": socket.gethostname()}  # a live process that is not this one
    probe = rundir.pid_alive

    def slow_probe(pid):  # B's liveness probe of the dead holder takes long enough for A to take over
        alive = probe(pid)
        if pid == dead.pid and not (tmp_path / "a.took").exists():
            (tmp_path / "a.took").touch()
            a.acquire()
        return alive

    monkeypatch.setattr(rundir, "pid_alive", slow_probe)
    with pytest.raises(RunDirBusyError, match=f"in use by process {os.getppid()} "):
        b.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getppid()  # A's lock is still there


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.recipe.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert not (tmp_path / LOCK).exists()
    with RunLock(tmp_path):  # free again
        assert (tmp_path / LOCK).is_file()


def test_a_torn_metrics_line_is_dropped_and_each_step_logged_once(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    n = len(_steps(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "st')  # a kill in the middle of an append
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, epochs=2).fit()
    assert any("unreadable line" in str(w.message) for w in caught)
    assert _steps(tmp_path) == list(range(1, 2 * n + 1))


def test_a_fresh_start_does_not_append_to_an_old_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 9.0}\n' * 30)
    _trainer(tmp_path).fit()  # no last.pt: a fresh run
    steps = _steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1))


def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.tmp{int(dead.stdout)}"  # that process has exited
    stale.write_bytes(b"x" * 100)
    mine = tmp_path / f".notes.pt.tmp{os.getpid()}"  # a live writer's (this process) is left alone
    mine.write_bytes(b"y")
    _trainer(tmp_path).fit()
    assert not stale.exists() and mine.exists()


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    net = tiny_net()
    sd = net.state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim > 1)
    sd[key][0].fill_(float("nan"))
    torch.save({"student": sd}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"non-finite.*{key}"):
        load_weights(tiny_net(), tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite"):
        mt.Teacher(tiny_net(), checkpoint=tmp_path / "nan.pt")


@pytest.mark.parametrize("build, field", [
    (lambda nan: mt.PGD(nan, 2 / 255, 2), "eps"),
    (lambda nan: mt.PGD(8 / 255, nan, 2), "alpha"),
    (lambda nan: mt.ANL(2, beta=nan), "beta"),
    (lambda nan: mt.ANL(2, rw=nan), "r_w"),
    (lambda nan: mt.KLDistill(nan), "temperature"),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_options_are_refused_by_name(build, field, bad):
    with pytest.raises(ValueError, match=field):
        build(bad)


@pytest.mark.parametrize("device", ["cuda:x", "cpu:abc", "gpu", "cuda:"])
def test_malformed_devices_are_refused_where_the_config_is_read(device):
    with pytest.raises(ValueError, match="unknown device"):
        mt.TrainConfig(device=device)


def test_an_empty_run_dir_is_refused():
    with pytest.raises(ValueError, match="run_dir"):
        mt.ExperimentConfig(preset="natural", run_dir="")


def test_a_nan_on_a_fresh_run_does_not_name_a_checkpoint_that_does_not_exist(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.optimizer.param_groups[0]["lr"] = 1e30
    trainer.cfg.lr = 1e30
    with pytest.raises(mt.trainer.NonFiniteLossError) as err:
        trainer.fit()
    assert "no checkpoint had been written yet" in str(err.value) and not (tmp_path / "last.pt").exists()


def _mtard_trainer(run_dir, epochs=2):
    torch.manual_seed(0)
    recipe = mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()), steps=2)
    loader = TensorLoader(synthetic(64, seed=0), 16, shuffle=True, augment=True, drop_last=True, seed=0)
    val = TensorLoader(synthetic(32, seed=1), 32)
    cfg = mt.TrainConfig(epochs=epochs, batch_size=16, lr=0.05, milestones=[], log_every=1, progress=False,
                         eval_every=1, eval_pgd_steps=2)
    return mt.Trainer(recipe, loader, cfg, val_loader=val, run_dir=run_dir)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.recipe.student.state_dict().values(),
                                                 b.recipe.student.state_dict().values()))


def test_sigterm_during_validation_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = _mtard_trainer(tmp_path / "ref")
    ref.fit()
    cut = _mtard_trainer(tmp_path / "cut")
    evaluate = cut.validator.evaluate

    def evaluate_then_sigterm(model):
        out = evaluate(model)
        if cut.epoch == 1:
            signal.raise_signal(signal.SIGTERM)  # arrives while epoch 1 is being validated
        return out

    cut.validator.evaluate = evaluate_then_sigterm
    res = cut.fit()
    assert res.status.startswith("interrupted") and res.epoch == 1
    resumed = _mtard_trainer(tmp_path / "cut")
    assert resumed.fit().status == "finished"
    assert _same_weights(ref, resumed) and resumed.global_step == ref.global_step


def test_a_kill_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL leaves the last epoch's checkpoint only: the rerun replays from it, exactly."""
    ref = _mtard_trainer(tmp_path / "ref")
    ref.fit()
    killed = _mtard_trainer(tmp_path / "cut")
    forward = killed.recipe.forward

    def dies_in_epoch_2(x, y, model=None):
        if killed.epoch == 1 and killed.global_step == killed.steps_per_epoch + 2:
            raise SystemExit("killed")  # nothing after the epoch-1 checkpoint is saved, as with SIGKILL
        return forward(x, y, model)

    killed.recipe.forward = dies_in_epoch_2
    with pytest.raises(SystemExit):
        killed.fit()
    resumed = _mtard_trainer(tmp_path / "cut")
    assert resumed.fit().status == "finished"
    assert _same_weights(ref, resumed)
    assert _steps(tmp_path / "cut") == _steps(tmp_path / "ref")  # each step logged once


def test_a_kill_between_last_pt_and_best_pt_is_repaired_at_resume(tmp_path):
    """best.pt is written after last.pt: a kill between the two leaves best.pt one best behind, and the
    resume rewrites it from last.pt (the best weights are that checkpoint's own)."""
    ref = _mtard_trainer(tmp_path / "ref", epochs=2)
    ref.fit()
    ref_best = torch.load(tmp_path / "ref" / "best.pt", weights_only=True)
    cut = _mtard_trainer(tmp_path / "cut", epochs=2)
    write_best = cut._write_best

    def dies_before_the_last_best(model):
        if cut.epoch == ref_best["epoch"]:
            raise SystemExit("killed")
        write_best(model)

    cut._write_best = dies_before_the_last_best
    with pytest.raises(SystemExit):
        cut.fit()
    stale = tmp_path / "cut" / "best.pt"
    assert not stale.exists() or torch.load(stale, weights_only=True)["epoch"] != ref_best["epoch"]
    _mtard_trainer(tmp_path / "cut", epochs=2).fit()
    best = torch.load(stale, weights_only=True)
    assert best["epoch"] == ref_best["epoch"] and best["metrics"] == ref_best["metrics"]
    assert all(torch.equal(a, b) for a, b in zip(best["student"].values(), ref_best["student"].values()))


def _write_split(folder, name, x=None, y=None, raw=None):
    folder.mkdir(exist_ok=True)
    if raw is not None:
        (folder / f"{name}.npz").write_bytes(raw)
        return
    a = synthetic(16, seed=0)
    np.savez(folder / f"{name}.npz", x=a.x if x is None else x, y=a.y if y is None else y)


@pytest.mark.parametrize("case, message", [
    ("label -1", "labels must be >= 0"),
    ("NaN labels", "labels must be integers"),
    ("float labels", "labels must be integers"),
    ("labels (N,1)", "one label per image"),
    ("zero-length", "holds no images"),
    ("object arrays", "object arrays"),
    ("truncated", "truncated"),
    ("test labels out of range", "test labels go up to 12"),
])
def test_bad_data_files_are_named_in_one_line(tmp_path, case, message):
    from multiteach.build import load_splits

    good = synthetic(16, seed=0)
    _write_split(tmp_path, "train")
    _write_split(tmp_path, "test")
    y = good.y.copy()
    if case == "label -1":
        y[3] = -1
        _write_split(tmp_path, "train", y=y)
    elif case == "NaN labels":
        _write_split(tmp_path, "train", y=np.where(np.arange(16) == 2, np.nan, y.astype(float)))
    elif case == "float labels":
        _write_split(tmp_path, "train", y=y.astype(np.float32) + 0.5)
    elif case == "labels (N,1)":
        _write_split(tmp_path, "train", y=y[:, None])
    elif case == "zero-length":
        _write_split(tmp_path, "train", x=good.x[:0], y=y[:0])
    elif case == "object arrays":
        np.savez(tmp_path / "train.npz", x=np.array([good.x[0], "text"], dtype=object), y=y[:2])
    elif case == "truncated":
        data = (tmp_path / "train.npz").read_bytes()
        _write_split(tmp_path, "train", raw=data[: len(data) // 2])
    elif case == "test labels out of range":
        y[0] = 12
        _write_split(tmp_path, "test", y=y)
    with pytest.raises(ValueError, match=message) as err:
        load_splits(mt.DataConfig(data_dir=str(tmp_path), val_size=4))
    line = one_line(err.value)
    assert "\n" not in line and ("train.npz" in line or "test" in line)


@pytest.mark.parametrize("case, message", [
    ("under a file", "cannot be used"),
    ("a file", "cannot be used"),
    ("300 characters", "cannot be used"),
])
def test_unusable_run_dirs_are_one_line(tmp_path, case, message):
    (tmp_path / "file").write_text("x")
    run_dir = {"under a file": tmp_path / "file" / "run", "a file": tmp_path / "file",
               "300 characters": tmp_path / ("r" * 300)}[case]
    with pytest.raises(ValueError, match=message):
        _trainer(run_dir).fit()


@pytest.mark.parametrize("case", ["a list", "a directory", "another class count"])
def test_a_last_pt_that_cannot_be_resumed_is_named(tmp_path, case):
    last = tmp_path / "last.pt"
    if case == "a list":
        torch.save([1, 2, 3], last)
    elif case == "a directory":
        last.mkdir()
    else:
        _trainer(tmp_path).fit()
        ckpt = torch.load(last, weights_only=True)
        ckpt["student"] = mt.presets.natural(tiny_net(num_classes=100)).student.state_dict()
        torch.save(ckpt, last)
    with pytest.raises(CheckpointError, match="last.pt") as err:
        _trainer(tmp_path, epochs=2).fit()
    assert "\n" not in one_line(err.value)


@pytest.mark.parametrize("text, message", [
    (b"[1, 2, 3]", "top level"),
    (b'{"preset": "natural\xff"}', "not UTF-8"),
])
def test_config_files_that_are_not_a_table_of_settings(tmp_path, text, message):
    from multiteach.config import read_config

    path = tmp_path / "c.json"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=message):
        read_config(path)


def test_a_seed_beyond_numpy_range_is_named():
    with pytest.raises(ValueError, match="seed"):
        mt.TrainConfig(seed=2**64)


def test_sigterm_before_training_starts_exits_3_in_one_line(monkeypatch, capsys):
    from multiteach import cli

    def start_up(args):
        signal.raise_signal(signal.SIGTERM)  # e.g. while the data loads
        raise AssertionError("the signal should have stopped the command")

    monkeypatch.setattr(cli, "cmd_presets", start_up)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["presets"]) == cli.EXIT_STOPPED
    assert "stopped by a signal" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_eval_refuses_an_output_it_cannot_write_before_attacking(tmp_path, capsys):
    from multiteach import cli

    ckpt = tmp_path / "m.pt"
    torch.save(mt.create_model("cifar_resnet8").state_dict(), ckpt)
    code = cli.main(["eval", str(ckpt), "--model", "cifar_resnet8", "--synthetic", "--out", str(tmp_path)])
    assert code == cli.EXIT_BAD_INPUT and "cannot be written" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 11, remaining cases

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _tiny_config(tmp_path, name="run", epochs=1, **data):
    """A natural-preset config of a few CPU seconds (cifar_resnet8, 2 steps of 16 images per epoch)."""
    from multiteach.cli import preset_config
    from multiteach.config import to_toml

    d = preset_config("natural")
    d["student"]["model"] = "cifar_resnet8"
    d["options"] = {}
    d["data"].update({"train_size": 64, "val_size": 32, **data})
    d["train"].update(epochs=epochs, batch_size=16, steps_per_epoch=2, lr=0.05, milestones=[], progress=False,
                      log_every=1, eval_pgd_steps=1)
    d["run_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(d))
    return path


def _one_error_line(err, logged=False):
    """The error, as the only line of stderr (``logged``: the last line, after the run's log lines)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and (logged or len(lines) == 1), err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def test_a_full_disk_at_the_checkpoint_write_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    import errno

    from multiteach import checkpoint, cli

    last = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 1}, last)

    def fills_the_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.atomic_save({"epoch": 2}, last)
    monkeypatch.undo()
    msg = one_line(err.value)
    assert str(last) in msg and "the disk is full" in msg and "previous last.pt is kept" in msg
    assert "free space" in msg and cli.exit_code(err.value) == cli.EXIT_BAD_INPUT
    assert torch.load(last, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_a_file_size_limit_at_the_last_pt_write_is_one_line_exit_2(tmp_path):
    """The CLI under a real RLIMIT_FSIZE (as a full disk): epoch 1's last.pt is written without the limit,
    epoch 2's write hits it; the previous last.pt stays readable and no temp file is left."""
    import resource

    from multiteach import cli

    cfg = _tiny_config(tmp_path, epochs=2)
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(cfg), "--synthetic", "--set", "train.epochs=1"]) == 0
    size = (run_dir / "last.pt").stat().st_size
    before = torch.load(run_dir / "last.pt", weights_only=True)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = subprocess.run([sys.executable, "-m", "multiteach.cli", "train", str(cfg), "--synthetic", "--force"],
                       capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=limit_file_size)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr, logged=True)
    assert f"writing '{run_dir / 'last.pt'}' failed: the file-size limit was reached" in line
    assert "previous last.pt is kept" in line and "ulimit -f" in line
    after = torch.load(run_dir / "last.pt", weights_only=True)
    assert after["epoch"] == before["epoch"] == 1 and after["global_step"] == before["global_step"]
    assert not list(run_dir.glob(".*.tmp*"))


def _loader_trainer(run_dir, n, epochs=1):
    torch.manual_seed(0)
    loader = TensorLoader(synthetic(n, seed=0), 16, shuffle=True, augment=True, drop_last=True, seed=0)
    cfg = mt.TrainConfig(epochs=epochs, batch_size=16, lr=0.05, milestones=[], log_every=1, progress=False,
                         eval_every=0)
    return mt.Trainer(mt.presets.natural(tiny_net()), loader, cfg, run_dir=run_dir)


def test_a_forced_resume_mid_epoch_over_fewer_training_images_is_refused_in_one_line(tmp_path):
    from multiteach import cli
    from tests.conftest import SignalAtStep

    cut = _loader_trainer(tmp_path, 64)
    cut.recipe.forward = SignalAtStep(cut.recipe.forward, 2)  # SIGTERM after step 2 of 4: mid-epoch last.pt
    assert cut.fit().status.startswith("interrupted")
    with pytest.raises(CheckpointError) as err:
        _loader_trainer(tmp_path, 48).fit(force=True)  # data.train_size lowered, --force
    msg = one_line(err.value)
    assert "over 64 training images; this run has 48" in msg and "--restart or another run_dir" in msg
    assert cli.exit_code(err.value) == cli.EXIT_BAD_INPUT and "\n" not in msg


def test_a_forced_resume_at_an_epoch_boundary_over_fewer_images_trains_on_them(tmp_path):
    assert _loader_trainer(tmp_path, 64).fit().status == "finished"
    res = _loader_trainer(tmp_path, 48, epochs=2).fit(force=True)
    assert res.status == "finished" and res.epoch == 2


@pytest.mark.parametrize("record, field", [
    ("oops", "experiment = 'oops', not a table"),
    ({"config": "oops"}, "experiment.config = 'oops', not a table"),
    ({"config": {"student": {"model": 123}}}, "experiment.config.student.model = 123, not a timm model name"),
    ({"config": {"student": {"model": ""}}}, "experiment.config.student.model = '', not a timm model name"),
])
def test_eval_of_a_checkpoint_with_a_bad_record_names_the_field(tmp_path, capsys, record, field):
    from multiteach import cli

    ckpt = tmp_path / "m.pt"
    torch.save({"student": mt.create_model("cifar_resnet8").state_dict(), "experiment": record}, ckpt)
    assert cli.main(["eval", str(ckpt), "--synthetic", "--n", "8"]) == cli.EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert field in line and "--model TIMM_NAME" in line and str(ckpt) in line


@pytest.mark.parametrize("override, field", [
    ("eval.experiment=oops", "eval.experiment: unknown setting (the settings here: "),
    ("eval.attacks=123", "eval.attacks: Input should be a valid list"),
    ("eval.eps=nan", "eval.eps: Input should be a finite number"),
])
def test_bad_eval_settings_in_a_config_are_named(tmp_path, capsys, override, field):
    from multiteach import cli

    assert cli.main(["train", str(_tiny_config(tmp_path)), "--synthetic", "--set", override]) == cli.EXIT_BAD_INPUT
    assert field in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_it_is_one_line_before_any_work(tmp_path, capsys):
    from multiteach import cli

    cfg = _tiny_config(tmp_path)
    assert cli.main(["train", str(cfg), "--synthetic", "--set", "train.device=mps"]) == cli.EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert line == "error: device 'mps' is not available on this machine: use 'cpu' or 'auto'"
    assert not (tmp_path / "run").exists()
    ckpt = tmp_path / "m.pt"
    torch.save(mt.create_model("cifar_resnet8").state_dict(), ckpt)
    code = cli.main(["eval", str(ckpt), "--model", "cifar_resnet8", "--synthetic", "--device", "mps"])
    assert code == cli.EXIT_BAD_INPUT and "'mps' is not available" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_refused(device):
    from multiteach.runtime import resolve_device

    with pytest.raises(ValueError, match="no usable CUDA GPU: set device = 'auto' or 'cpu'"):
        resolve_device(device)


def test_a_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    from multiteach.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


STOP_EVAL = """
import importlib
import signal
import sys
from multiteach import cli

# Ctrl-C as at a terminal, even when this test runs in a background job (whose children inherit SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

ev = importlib.import_module("multiteach.evaluation")  # the module (the package's attribute is the function)

real = ev.evaluate

def evaluate_until_stopped(*args, **kwargs):  # real attacks, again and again, until the signal comes
    print("EVAL STARTED", file=sys.stderr, flush=True)
    while True:
        real(*args, **kwargs)

ev.evaluate = evaluate_until_stopped
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_eval_exits_3_in_one_line(tmp_path, sig):
    ckpt, out = tmp_path / "m.pt", tmp_path / "e.json"
    torch.save(mt.create_model("cifar_resnet8").state_dict(), ckpt)
    proc = subprocess.Popen([sys.executable, "-c", STOP_EVAL, "eval", str(ckpt), "--model", "cifar_resnet8",
                             "--synthetic", "--n", "16", "--attacks", "fgsm", "pgd_sat", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stderr.readline().strip() == "EVAL STARTED"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)  # never a hang, whatever the process does with the signal
        assert proc.returncode == 3, err
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if "stopped" in line]
    assert stopped == ["stopped by a signal during eval: no report was written; run the same command again"], err
    assert not out.exists()


def test_a_full_disk_on_any_other_write_is_exit_2_naming_the_file():
    import errno

    from multiteach import cli

    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.jsonl")
    assert cli.exit_code(e) == cli.EXIT_BAD_INPUT
    assert one_line(e) == ("writing 'runs/x/metrics.jsonl' failed: no space left on the disk (No space left on "
                           "device): free space (or write elsewhere) and run the same command again; a training "
                           "resumes from its last checkpoint")
    assert cli.exit_code(OSError(errno.EIO, "I/O error")) == cli.EXIT_INTERNAL


def test_an_example_ends_as_the_cli_does(capsys):
    """run_command: the examples' stops (a stage's StageStopped, Ctrl-C, a scheduler's SIGTERM anywhere) end with
    exit code 3 and one line, not a traceback; SIGTERM's own handler is given back; bad input is one line
    (exit 2) and a bug keeps its traceback."""
    from multiteach.pipeline import StageStopped, run_command

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(lambda: 7) == 7

    def stage():
        raise StageStopped("runs/x: interrupted (SIGTERM); run the same command again to resume")

    def sigterm():
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    for main in (stage, sigterm):
        with pytest.raises(SystemExit) as stop:
            run_command(main)
        assert stop.value.code == 3
    out = capsys.readouterr().err
    assert "stopped: runs/x: interrupted (SIGTERM)" in out and "stopped by a signal" in out
    assert "Traceback" not in out and signal.getsignal(signal.SIGTERM) == before

    def missing():  # bad input or environment: one line, exit 2, as the CLI
        raise FileNotFoundError("no train.npz in 'data/': give --data-dir")

    with pytest.raises(SystemExit) as stop:
        run_command(missing)
    assert stop.value.code == 2 and "error: no train.npz in 'data/'" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command(lambda: 1 / 0)


def test_a_finished_stage_of_another_config_is_refused_not_reused(tmp_path):
    """A run folder holding a finished run is skipped only for the same configuration: one trained with other
    options (another KL reduction, another teacher) is refused in one line naming the difference, instead of
    its results being passed off as this configuration's."""
    data = config.DataConfig(val_size=32, train_size=96)
    splits = build.load_splits(data, synthetic_data=True)
    train = dict(epochs=1, batch_size=32, lr=0.05, milestones=[], progress=False, eval_every=1, eval_pgd_steps=1,
                 device="cpu")
    cfg = stage_config("sat", "cifar_resnet8", data, tmp_path / "run", options={"steps": 1}, **train)
    best = train_stage(cfg, splits)
    stamp = best.stat().st_mtime_ns
    assert json.loads((tmp_path / "run" / "done.json").read_text())["digest"] == cfg.digest()
    assert train_stage(cfg.model_copy(update={"run_dir": str(tmp_path / "run")}), splits) == best  # skipped
    assert best.stat().st_mtime_ns == stamp
    other = stage_config("sat", "cifar_resnet8", data, tmp_path / "run", options={"steps": 2}, **train)
    with pytest.raises(ConfigMismatchError, match=r"another configuration \(options.steps: 1 -> 2\)"):
        train_stage(other, splits)
    # a stage trained under another budget share is another stage (the time left when it starts is not)
    budgeted = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stage_budget_s": 75.0})})
    with pytest.raises(ConfigMismatchError, match=r"finished run .*train.stage_budget_s: None -> 75.0"):
        train_stage(budgeted, splits)
    # a time budget that no stage_budget_s names has the unbudgeted digest: refused, not reused (see below)
    timed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"time_budget_s": 75.0})})
    with pytest.raises(ConfigMismatchError, match="holds an unbudgeted run, and this configuration asks for a 75-s"):
        train_stage(timed, splits)
    assert best.stat().st_mtime_ns == stamp
    # a stopped run (last.pt, no done.json) is checked too, before anything trains
    (tmp_path / "run" / "done.json").unlink()
    check_run_dir(cfg)
    with pytest.raises(ConfigMismatchError, match=r"holds a stopped run of another configuration \(options.steps"):
        check_run_dir(other)
    check_run_dir(other.model_copy(update={"run_dir": str(tmp_path / "empty")}))
    # a run finished under a time budget before budgets named their stages: its digest is an unbudgeted run's,
    # and it is refused as one (its done.json has no stage_budget_s; its best.pt records the budget)
    (tmp_path / "run" / "done.json").write_text(json.dumps({"digest": cfg.digest()}))
    check_run_dir(cfg)  # unbudgeted: reused
    ckpt = torch.load(best, weights_only=False)
    ckpt["experiment"]["config"]["train"]["time_budget_s"] = 75.0
    torch.save(ckpt, best)
    with pytest.raises(ConfigMismatchError, match="under a 75-s time budget"):
        check_run_dir(cfg)


def _stage(run_dir, **train):
    data = config.DataConfig(val_size=32, train_size=64)
    train = dict(epochs=1, batch_size=32, lr=0.05, milestones=[], progress=False, eval_every=1, eval_pgd_steps=1,
                 device="cpu") | train
    splits = build.load_splits(data, synthetic_data=True)
    return stage_config("natural", "cifar_resnet8", data, run_dir, **train), splits


def test_a_stage_without_validation_keeps_its_final_weights_as_best_pt(tmp_path):
    """eval_every=0 selects nothing: best.pt still exists (the final weights, recorded as such), or done.json
    would send every later stage and rerun to a best.pt that is not there."""
    from multiteach.checkpoint import load_checkpoint
    from multiteach.teachers import load_model

    cfg, splits = _stage(tmp_path / "run", eval_every=0)
    best = train_stage(cfg, splits)
    ckpt = load_checkpoint(best)
    assert (ckpt["epoch"], ckpt["weights"], ckpt["metrics"]) == (1, "last", {})
    assert ckpt["experiment"]["digest"] == cfg.digest()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.equal(v, last["student"][k]) for k, v in ckpt["student"].items())
    load_model("cifar_resnet8", best, 10)
    assert train_stage(cfg, splits) == best  # skipped, and it is there


def test_a_time_budget_no_stage_names_is_not_reused_as_the_full_recipe(tmp_path):
    """time_budget_s is not in the digest (it is the time left when a stage starts): a run cut by a budget that
    no stage_budget_s names must not be passed off as the unbudgeted recipe of the same digest."""
    cfg, splits = _stage(tmp_path / "run", epochs=3, time_budget_s=0.01)
    train_stage(cfg, splits)
    full = cfg.model_copy(update={"train": cfg.train.model_copy(update={"time_budget_s": None})})
    assert full.digest() == cfg.digest()
    with pytest.raises(ConfigMismatchError, match=r"holds a run trained under a 0-s time budget.*set stage_budget_s"):
        train_stage(full, splits)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"time_budget_s": 600.0})})
    assert train_stage(longer, splits) == tmp_path / "run" / "best.pt"  # budgeted both: the time left is no matter


def test_an_unreadable_done_json_is_named_with_the_fix(tmp_path):
    cfg, _ = _stage(tmp_path)
    (tmp_path / "done.json").write_text("")
    with pytest.raises(ValueError, match=r"done.json cannot be read \(it is empty\): delete it and run again") as err:
        train_stage(cfg)
    assert str(tmp_path / "done.json") in str(err.value)
    (tmp_path / "done.json").write_text('{"best": {"epo')
    with pytest.raises(ValueError, match="done.json cannot be read .*delete it"):
        check_run_dir(cfg)

    from multiteach.pipeline import read_done  # what every reader of done.json uses

    (tmp_path / "done.json").unlink()
    assert read_done(tmp_path) is None
    (tmp_path / "done.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no record of a finished stage: delete it"):
        read_done(tmp_path)


def test_a_kill_while_done_json_is_written_leaves_no_torn_record(tmp_path, monkeypatch):
    """A kill in the middle of writing done.json (of a plain write, or before an atomic write's rename) leaves
    no done.json or a whole one; the rerun finishes the stage from its last.pt."""
    from pathlib import Path

    cfg, splits = _stage(tmp_path / "run")
    done = tmp_path / "run" / "done.json"
    write_text, replace = Path.write_text, os.replace

    def killed_writing(self, data, *a, **k):
        if self.name != "done.json":
            return write_text(self, data, *a, **k)
        write_text(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    def killed_renaming(src, dst):
        if Path(dst).name == "done.json":
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(Path, "write_text", killed_writing)
    monkeypatch.setattr(os, "replace", killed_renaming)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, splits)
    monkeypatch.undo()
    assert not done.exists() or json.loads(done.read_text())["digest"] == cfg.digest()  # never a torn one
    assert not list((tmp_path / "run").glob(".*.tmp*"))
    assert train_stage(cfg, splits).is_file() and json.loads(done.read_text())["digest"] == cfg.digest()
