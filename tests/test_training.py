import json

import pytest
import torch

import multiteach as mt
from multiteach.data import TensorLoader, synthetic
from tests.conftest import SignalAtStep, tiny_net


def _mtard(seed=0):
    torch.manual_seed(seed)
    return mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()), steps=2)


def _loader():
    return TensorLoader(synthetic(256, seed=0), 32, shuffle=True, augment=True, drop_last=True, seed=0)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=32, lr=0.05, milestones=[1], log_every=1, progress=False, eval_every=0)
    return mt.TrainConfig(**{**base, **kw})


def _trace(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["L"], r["w"]) for r in rows if r["type"] == "step"]


def test_two_epochs_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    recipe = mt.presets.natural(tiny_net())
    loader = TensorLoader(synthetic(512, seed=0), 32, shuffle=True, augment=True, drop_last=True)
    val = TensorLoader(synthetic(128, seed=1), 64)
    cfg = _cfg(epochs=4, lr=0.1, milestones=[], eval_every=1)
    res = mt.Trainer(recipe, loader, cfg, val_loader=val, run_dir=tmp_path).fit()
    trace = _trace(tmp_path)
    first = sum(t[1] for t in trace[:5]) / 5
    last = sum(t[1] for t in trace[-5:]) / 5
    assert last < 0.7 * first
    assert res.history[-1]["val_clean"] > 0.3  # toy classes are learnable; chance is 0.1
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_mtard_run_lowers_the_distillation_loss(tmp_path):
    recipe = _mtard()
    mt.Trainer(recipe, _loader(), _cfg(epochs=2, lr=0.1), run_dir=tmp_path).fit()
    trace = _trace(tmp_path)
    assert sum(t[1] for t in trace[-4:]) < sum(t[1] for t in trace[:4])
    assert trace[-1][3] != [0.5, 0.5]  # ANL moved the weights


def test_stop_and_resume_gives_the_uninterrupted_trace(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = mt.Trainer(_mtard(), _loader(), _cfg(), run_dir=ref_dir)
    ref.fit()

    trainer = mt.Trainer(_mtard(), _loader(), _cfg(), run_dir=cut_dir)
    trainer.recipe.forward = SignalAtStep(trainer.recipe.forward, 3)  # SIGTERM in the middle of epoch 1
    res = trainer.fit()
    assert res.status.startswith("interrupted") and res.global_step == 3

    fresh = _mtard()  # same teachers (they are not in the checkpoint), student wiped
    with torch.no_grad():
        for p in fresh.student.parameters():
            p.zero_()
    resumed = mt.Trainer(fresh, _loader(), _cfg(), run_dir=cut_dir)
    res = resumed.fit()
    assert res.status == "finished" and res.global_step == ref.global_step
    assert _trace(cut_dir) == _trace(ref_dir)
    for a, b in zip(ref.recipe.student.state_dict().values(), resumed.recipe.student.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(ref.recipe.weighter.weights, resumed.recipe.weighter.weights)


def test_resume_under_another_config_is_refused(tmp_path):
    exp = {"digest": "a", "config": {"train": {"lr": 0.05}}}
    mt.Trainer(_mtard(), _loader(), _cfg(epochs=1), run_dir=tmp_path, experiment=exp).fit()
    other = {"digest": "b", "config": {"train": {"lr": 0.1}}}
    with pytest.raises(mt.trainer.ConfigMismatchError, match="lr"):
        mt.Trainer(_mtard(), _loader(), _cfg(epochs=2), run_dir=tmp_path, experiment=other).fit()
    res = mt.Trainer(_mtard(), _loader(), _cfg(epochs=2), run_dir=tmp_path, experiment=other).fit(force=True)
    assert res.epoch == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = mt.Trainer(_mtard(), _loader(), _cfg(epochs=3, log_every=2), run_dir=tmp_path)
    trainer.fit()  # 3 good epochs
    good = torch.load(tmp_path / "last.pt", weights_only=True)["global_step"]
    bad = mt.Trainer(_mtard(), _loader(), _cfg(epochs=4, log_every=2, lr=1e30), run_dir=tmp_path)
    with pytest.raises(mt.trainer.NonFiniteLossError, match="last good checkpoint"):
        bad.fit(force=True)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == good
