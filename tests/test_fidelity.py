"""Fidelity of today's presets to their official code, beyond the loss formulas (tests/test_presets.py):
the CIFAR-100 KL factor, schedules as the code runs them, TRADES' own settings, SAT's attack mode, and the
official schedule applied the same way from the Python API, a config file and the CLI."""

import pytest
import torch

import multiteach as mt
from multiteach.config import ExperimentConfig, TrainConfig
from multiteach.pipeline import stage_config
from multiteach.registry import ATTACKS, PRESETS
from tests.conftest import tiny_net

KL_PRESETS = {"mtard": 2, "bmtard": 2, "baseline": 1, "baseline_mt": 2, "mtard3": 3, "rslad": 1}


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


@pytest.mark.parametrize("preset", list(KL_PRESETS))
def test_cifar100_multiplies_the_kl_by_ten_as_the_official_scripts(preset):
    teachers = [mt.Teacher(tiny_net(100, seed=k)) for k in range(1, 1 + KL_PRESETS[preset])]
    x, y = batch()
    losses = {}
    for scale in (None, 1.0):
        recipe = PRESETS[preset].fn(tiny_net(100, seed=0), *teachers, num_classes=100, kl_scale=scale).train()
        torch.manual_seed(3)
        losses[scale] = recipe(x, y).losses
    torch.testing.assert_close(losses[None], 10 * losses[1.0], rtol=1e-5, atol=1e-8)
    ten = PRESETS[preset].fn(tiny_net(seed=0), *[mt.Teacher(tiny_net(seed=k)) for k in (1, 2, 3)][:KL_PRESETS[preset]])
    assert all(b.loss.scale == 1.0 for b in ten.branches)  # CIFAR-10: the official x1


def test_ard_trains_at_a_tenth_from_epoch_100_to_the_end_as_its_code():
    assert PRESETS["ard"].schedule == {"epochs": 200, "milestones": (100,)}
    cfg = ExperimentConfig(preset="ard", teachers={"adv": {"model": "cifar_resnet8"}})
    assert cfg.train.epochs == 200 and cfg.train.lr_factor(150) == pytest.approx(0.1)


def test_trades_uses_its_repository_settings_and_names_the_mtard_variant():
    t = mt.presets.trades(tiny_net())
    pgd = t.branches[1].transform
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.start) == (0.031, 0.007, 10, "normal")
    assert PRESETS["trades"].schedule == {"epochs": 76, "milestones": (75,)}
    v = PRESETS["trades_mtard"].fn(tiny_net()).branches[1].transform
    assert (v.eps, v.alpha) == (8 / 255, 2 / 255)
    ev = ATTACKS.build("pgd_trades")  # the TRADES evaluation script: 20 steps of 0.003 from a uniform start
    assert (ev.steps, ev.alpha, ev.start) == (20, 0.003, "uniform")


def test_sat_attacks_in_train_mode_as_madrylab_unless_told():
    assert mt.presets.sat(tiny_net()).branches[0].transform.bn_mode == "train"
    assert mt.presets.sat(tiny_net(), bn_mode="eval").branches[0].transform.bn_mode == "eval"


@pytest.mark.parametrize("preset", ["natural", "sat", "trades", "ard", "rslad", "mtard"])
def test_the_official_schedule_is_the_same_from_every_entry_point(preset, tmp_path):
    from multiteach.cli import main

    want = PRESETS[preset].schedule
    teachers = {r: ("cifar_resnet8", tmp_path / "t.pt") for r in PRESETS[preset].teachers}
    (tmp_path / "t.pt").write_bytes(b"")
    cfg = stage_config(preset, "cifar_resnet8", {}, tmp_path / "run", teachers=teachers, lr=0.05)
    assert (cfg.train.epochs, tuple(cfg.train.milestones)) == (want["epochs"], tuple(want["milestones"]))
    explicit = stage_config(preset, "cifar_resnet8", {}, tmp_path / "run", teachers=teachers, epochs=3,
                            milestones=[2])
    assert (explicit.train.epochs, explicit.train.milestones) == (3, [2])  # what is given stays
    out = tmp_path / f"{preset}.toml"
    assert main(["config", preset, "--output", str(out)]) == 0
    from multiteach.config import read_config

    written = read_config(out)["train"]
    assert (written["epochs"], tuple(written["milestones"])) == (want["epochs"], tuple(want["milestones"]))
    as_object = ExperimentConfig(preset=preset, train=TrainConfig(lr=0.05),
                                 teachers={r: {"model": "cifar_resnet8"} for r in PRESETS[preset].teachers})
    assert as_object.train.epochs == want["epochs"] and as_object.train.lr == 0.05
