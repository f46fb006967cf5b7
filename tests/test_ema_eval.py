"""The student's EMA (hand-computed, checkpointed, validated), TimedEvaluation's time rules, the KL reduction."""

import copy
import importlib
import inspect
import json
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import multiteach as mt
import multiteach.engine.validator as mt_validator
import multiteach.trainer as mt_trainer
from multiteach.data import TensorLoader, synthetic
from multiteach.evaluation import TimedEvaluation, correct_mask
from multiteach.presets import PRESETS
from multiteach.signals import DeadlinePassed, deadline
from tests.conftest import SignalAtStep, tiny_net

DECAY = 0.6  # 1 - (1 + s)^-0.75 passes 0.6 at s = 3: the warmup AND the cap both show up in a 12-step run


def _loader(n=128, seed=0):  # 4 steps per epoch
    return TensorLoader(synthetic(n, seed=seed), 32, shuffle=True, augment=True, drop_last=True, seed=0)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=32, lr=0.05, milestones=[1], log_every=1, progress=False, eval_every=0,
                ema_decay=DECAY)
    return mt.TrainConfig(**{**base, **kw})


def _mtard(seed=0):
    torch.manual_seed(seed)
    return mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()), steps=2)


def _natural(seed=0):
    torch.manual_seed(seed)
    return mt.presets.natural(tiny_net())


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_states_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def timm_decay(k, d):
    """timm ModelEmaV3.get_decay(step=k), update_after_step 0, warmup (gamma 1, power 3/4), min_decay 0."""
    s = max(0, k - 1)
    return 0.0 if s <= 0 else min(d, 1 - (1 + s) ** -0.75)


# ----------------------------------------------------------------------------- 1. EMA against a hand computation
def test_ema_matches_a_float64_hand_computation_of_params_and_bn_buffers(tmp_path):
    trainer = mt.Trainer(_natural(), _loader(), _cfg(epochs=3, lr=0.1), run_dir=tmp_path)
    student = trainer.recipe.student
    init = _clone(student.state_dict())
    snaps = []
    step = trainer.optimizer.step

    def recording_step(*a, **kw):  # the student's state as the EMA update sees it (BN stats already moved)
        out = step(*a, **kw)
        snaps.append(_clone(student.state_dict()))
        return out

    trainer.optimizer.step = recording_step
    res = trainer.fit()
    assert res.global_step == len(snaps) == 12

    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in init.items()}
    for k, snap in enumerate(snaps, start=1):
        d = timm_decay(k, DECAY)
        for name, v in snap.items():
            ema[name] = d * ema[name] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    assert timm_decay(1, DECAY) == 0.0 and timm_decay(2, DECAY) == pytest.approx(1 - 2 ** -0.75)
    assert timm_decay(12, DECAY) == DECAY  # the cap was reached

    got = trainer.ema.module.state_dict()
    assert list(got) == list(ema)
    buffers = [k for k in got if "running_" in k]
    assert buffers  # BatchNorm running stats are averaged too, not copied
    for name, want in ema.items():
        if want.is_floating_point():
            torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)
        else:  # num_batches_tracked: copied from the student
            assert torch.equal(got[name], snaps[-1][name]), name
    for name in buffers:  # and the average really differs from the last raw value
        assert not torch.allclose(got[name], snaps[-1][name])
    assert not trainer.ema.module.training  # the EMA copy stays in eval mode


def test_ema_first_update_copies_the_student_exactly(tmp_path):
    trainer = mt.Trainer(_natural(), _loader(), _cfg(epochs=1, steps_per_epoch=1), run_dir=tmp_path)
    trainer.fit()
    _assert_states_equal(trainer.ema.module.state_dict(), trainer.recipe.student.state_dict())


# ----------------------------------------------------------------------------- 2. checkpoint / resume
def test_interrupted_and_resumed_ema_is_bit_identical(tmp_path):
    ref = mt.Trainer(_mtard(), _loader(), _cfg(), run_dir=tmp_path / "ref")
    ref.fit()

    cut = mt.Trainer(_mtard(), _loader(), _cfg(), run_dir=tmp_path / "cut")
    cut.recipe.forward = SignalAtStep(cut.recipe.forward, 3)  # mid-epoch 1
    res = cut.fit()
    assert res.status.startswith("interrupted") and res.global_step == 3
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["step_in_epoch"] == 3
    _assert_states_equal(saved["ema"], cut.ema.module.state_dict())

    fresh = _mtard()
    with torch.no_grad():  # a wiped student: the EMA must come from the checkpoint, not from this copy
        for p in fresh.student.parameters():
            p.zero_()
    resumed = mt.Trainer(fresh, _loader(), _cfg(), run_dir=tmp_path / "cut")
    res = resumed.fit()
    assert res.status == "finished" and res.global_step == ref.global_step == 8
    _assert_states_equal(resumed.ema.module.state_dict(), ref.ema.module.state_dict())
    _assert_states_equal(resumed.recipe.student.state_dict(), ref.recipe.student.state_dict())
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    _assert_states_equal(last["ema"], ref.ema.module.state_dict())
    assert not torch.equal(last["ema"]["linear.weight"], last["student"]["linear.weight"])  # a real average


def test_resuming_with_ema_from_a_checkpoint_without_ema_is_refused(tmp_path):
    mt.Trainer(_natural(), _loader(), _cfg(epochs=1, ema_decay=None), run_dir=tmp_path).fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["ema"] is None
    with pytest.raises(mt_trainer.ConfigMismatchError, match="EMA"):
        mt.Trainer(_natural(), _loader(), _cfg(epochs=2), run_dir=tmp_path).fit()
    # without EMA the same checkpoint resumes
    res = mt.Trainer(_natural(), _loader(), _cfg(epochs=2, ema_decay=None), run_dir=tmp_path).fit()
    assert res.status == "finished" and res.epoch == 2


# ----------------------------------------------------------------------------- 3. validation: raw or EMA
def _epoch_records(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "epoch"]


def _recording_evaluate(trainer, seen):
    evaluate = trainer.validator.evaluate

    def wrapped(model=None):
        m = evaluate(model)
        tag = "ema" if model is trainer.ema.module else "raw"
        seen[(trainer.epoch, tag)] = (m, _clone(model.state_dict()))
        return m

    return wrapped


def test_validation_reports_raw_and_ema_and_best_pt_keeps_the_better(tmp_path):
    val = TensorLoader(synthetic(32, seed=1), 32)
    cfg = _cfg(epochs=3, lr=0.1, milestones=[], eval_every=1, eval_pgd_steps=2)
    trainer = mt.Trainer(_natural(), _loader(), cfg, val_loader=val, run_dir=tmp_path)
    seen = {}
    trainer.validator.evaluate = _recording_evaluate(trainer, seen)
    res = trainer.fit()

    records = _epoch_records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    best = None
    for r in records:
        for p in ("val_", "val_ema_"):
            for k in ("clean", "robust", "w_robust"):
                assert 0.0 <= r[p + k] <= 1.0
            assert r[p + "w_robust"] == pytest.approx((r[p + "clean"] + r[p + "robust"]) / 2)
        for tag, p in (("raw", "val_"), ("ema", "val_ema_")):
            m = seen[(r["epoch"], tag)][0]
            assert {k: r[p + k] for k in m} == m
            if best is None or m["w_robust"] > best[2]["w_robust"]:  # raw first, ties keep the earlier
                best = (r["epoch"], tag, m)

    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    epoch, tag, metrics = best
    assert (ckpt["epoch"], ckpt["weights"]) == (epoch, tag)
    assert ckpt["metrics"] == metrics
    assert res.best["weights"] == tag and res.best["epoch"] == epoch
    _assert_states_equal(ckpt["student"], seen[(epoch, tag)][1])
    if epoch == 3:  # the best is the last epoch's: best.pt holds the live EMA (or raw) weights
        live = trainer.ema.module if tag == "ema" else trainer.recipe.student
        _assert_states_equal(ckpt["student"], live.state_dict())


def test_selecting_on_clean_accuracy_runs_no_attack_and_natural_training_selects_so(tmp_path, monkeypatch):
    """A natural teacher is chosen by clean accuracy: its validation runs no PGD (which would only cost time),
    records no robust figure, and the log, the summary and the plots do without one."""
    from multiteach.engine.runlog import epoch_line
    from multiteach.plots import plot_run

    def no_attack(*a, **k):
        raise AssertionError("selecting on clean accuracy must not attack")

    monkeypatch.setattr(mt.PGD, "perturb", no_attack)
    val = TensorLoader(synthetic(32, seed=1), 32)
    cfg = _cfg(epochs=2, eval_every=1, select="clean")
    res = mt.Trainer(_natural(), _loader(), cfg, val_loader=val, run_dir=tmp_path).fit()
    records = _epoch_records(tmp_path)
    assert all("val_clean" in r and "val_ema_clean" in r and "val_robust" not in r for r in records)
    best = max((r[f"{p}clean"], -r["epoch"], p) for r in records for p in ("val_", "val_ema_"))
    assert res.best["score"] == res.best["clean"] == best[0] and "robust" not in res.best
    assert "robust" not in epoch_line(records[0], ["ce"]) and "val clean" in epoch_line(records[0], ["ce"])
    assert (tmp_path / "accuracy.png") in plot_run(tmp_path, tmp_path)

    assert mt.ExperimentConfig(preset="natural").train.select == "clean"  # the preset's default ...
    assert mt.ExperimentConfig(preset="natural", train={"select": "w_robust"}).train.select == "w_robust"  # ... or not
    assert mt.ExperimentConfig(preset="sat").train.select == "w_robust"


def test_best_pt_switches_between_raw_and_ema_by_w_robust(tmp_path, monkeypatch):
    """Scripted validation scores: epoch 1 raw wins, epoch 2 the EMA beats it, epoch 3 beats neither."""
    val = TensorLoader(synthetic(32, seed=1), 32)
    cfg = _cfg(epochs=3, lr=0.1, milestones=[], eval_every=1)
    trainer = mt.Trainer(_natural(), _loader(), cfg, val_loader=val, run_dir=tmp_path)
    script = {(1, "raw"): (0.5, 0.3), (1, "ema"): (0.4, 0.2), (2, "raw"): (0.5, 0.2), (2, "ema"): (0.6, 0.4),
              (3, "raw"): (0.7, 0.1), (3, "ema"): (0.9, 0.05)}
    states, best_before = {}, {}

    def fake(model, loader, steps=20, eps=8 / 255, dist=None, norm="Linf"):
        tag = "ema" if model is trainer.ema.module else "raw"
        key = (trainer.epoch, tag)
        states[key] = _clone(model.state_dict())
        if tag == "raw" and (tmp_path / "best.pt").is_file():
            best_before[trainer.epoch] = torch.load(tmp_path / "best.pt", weights_only=True)
        clean, robust = script[key]
        return {"clean": clean, "robust": robust}

    monkeypatch.setattr(mt_validator, "clean_and_pgd", fake)
    trainer.fit()

    after_1 = best_before[2]
    assert after_1["weights"] == "raw" and after_1["epoch"] == 1
    assert after_1["metrics"] == {"clean": 0.5, "robust": 0.3, "w_robust": pytest.approx(0.4)}
    _assert_states_equal(after_1["student"], states[(1, "raw")])

    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["weights"] == "ema" and ckpt["epoch"] == 2
    assert ckpt["metrics"] == {"clean": 0.6, "robust": 0.4, "w_robust": pytest.approx(0.5)}
    _assert_states_equal(ckpt["student"], states[(2, "ema")])
    assert not torch.equal(states[(2, "ema")]["linear.weight"], states[(2, "raw")]["linear.weight"])
    rec = _epoch_records(tmp_path)[1]
    assert (rec["val_clean"], rec["val_ema_clean"]) == (0.5, 0.6)
    assert trainer.best["weights"] == "ema" and trainer.best["score"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- 4. TimedEvaluation
class Counted:
    """An attack that counts its calls; ``steps`` (the cost attack_cost reads) may claim far more than it runs."""

    def __init__(self, attack, steps=None, on_call=None, fail_at=None):
        self.attack, self.calls, self.on_call, self.fail_at = attack, 0, on_call, fail_at
        self.steps = attack.steps if steps is None else steps

    def __call__(self, model, x, y):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("kaboom")
        out = self.attack(model, x, y)
        if self.on_call is not None:
            self.on_call(self.calls)
        return out

    def __repr__(self):
        return f"Counted({self.attack!r})"


@pytest.fixture(scope="module")
def net_and_data():
    """An untrained tiny net and 64 images, labelled so that exactly the first 24 are classified correctly."""
    net = tiny_net(seed=0).eval()
    a = synthetic(64, seed=1)
    x = torch.from_numpy(a.x).permute(0, 3, 1, 2).contiguous().float() / 255
    with torch.no_grad():
        pred = net(x).argmax(1)
    y = torch.where(torch.arange(64) < 24, pred, (pred + 1) % 10)
    assert correct_mask(net, x, y).tolist() == [True] * 24 + [False] * 40
    return net, x, y


def _pgd(start="uniform"):
    return mt.PGD(8 / 255, 2 / 255, 2, start=start)


def test_timed_rows_that_would_not_fit_are_skipped_and_required_rows_run(net_and_data):
    net, x, y = net_and_data
    budget = [1e9]
    te = TimedEvaluation(x, y, left=lambda: budget[0], batch_size=64, margin_s=5.0)
    assert te.clean("m", net) == pytest.approx(24 / 64)
    cheap, costly = Counted(_pgd()), Counted(_pgd(), steps=10**9)
    p_cheap, p_costly = te.predict(cheap, 64), te.predict(costly, 64)
    assert 0 < p_cheap < p_costly and p_costly / p_cheap == pytest.approx(10**9 / 2)

    budget[0] = 5.0 + (p_cheap * p_costly) ** 0.5  # room for the cheap row, not for the costly one
    row = te.row("m", net, "cheap", cheap)
    assert row is not None and row.n == 64 and cheap.calls == 1
    assert row.clean == pytest.approx(24 / 64) and row.w_robust == pytest.approx((row.clean + row.robust) / 2)

    p_costly = te.predict(costly, 64)  # now from the rate measured on the cheap row
    budget[0] = 5.0 + 0.99 * p_costly  # left() - margin_s just below the prediction: skipped, never called
    assert te.row("m", net, "costly", costly) is None and costly.calls == 0
    assert te.skipped == ["m/costly (no time left)"]
    budget[0] = 5.0 + 1.01 * p_costly  # just above: it runs
    assert te.row("m", net, "costly", costly).n == 64 and costly.calls == 1

    budget[0] = -100.0  # no time at all
    assert te.row("m", net, "late", Counted(_pgd())) is None
    forced = Counted(_pgd())
    row = te.row("m", net, "forced", forced, required=True)
    assert row is not None and row.n == 64 and forced.calls == 1
    assert te.skipped == ["m/costly (no time left)", "m/late (no time left)"]
    assert [r.attack for r in te.reports["m"].rows] == ["cheap", "costly", "forced"]


def test_a_predicted_overrun_via_attack_cost_skips_the_row(net_and_data, monkeypatch):
    ev = importlib.import_module("multiteach.evaluation")  # the package's `evaluate` attribute is the function

    net, x, y = net_and_data
    te = TimedEvaluation(x, y, left=lambda: 60.0, batch_size=64, margin_s=5.0)
    te.clean("m", net)
    monkeypatch.setattr(ev, "attack_cost", lambda attack: 1e12)
    attack = Counted(_pgd())
    assert te.row("m", net, "pgd", attack) is None and attack.calls == 0
    assert te.skipped == ["m/pgd (no time left)"] and te.reports["m"].rows == []


def test_a_chunked_row_stops_when_time_runs_out_and_reports_the_images_covered(net_and_data):
    net, x, y = net_and_data
    budget = [1e9]

    def out_of_time_after_two(calls):
        if calls == 2:
            budget[0] = 0.0

    attack = Counted(_pgd("none"), on_call=out_of_time_after_two)
    te = TimedEvaluation(x, y, left=lambda: budget[0], batch_size=64, margin_s=5.0)
    te.clean("m", net)
    row = te.row("m", net, "slow", attack, n=48, chunk=16)
    assert attack.calls == 2
    assert row is not None and row.n == 32
    assert row.clean == pytest.approx(24 / 32)  # the first 32 images' clean accuracy, not all 64's (24 / 64)
    want = correct_mask(net, x[:32], y[:32], _pgd("none")).float().mean().item()
    assert row.robust == pytest.approx(want)
    assert te.reports["m"].rows == [row] and te.skipped == ["m/slow: images 32-48 (no time left)"]  # said, not lost

    budget[0] = 1e9  # with time left the whole n is covered, in chunks
    full = Counted(_pgd("none"))
    row = te.row("m", net, "slow_full", full, n=48, chunk=16)
    assert full.calls == 3 and row.n == 48 and row.clean == pytest.approx(24 / 48)


class Stalls:
    """An attack whose calls from ``stall_at`` on run ``seconds`` (a minute: what a row predicted to fit but
    running far longer looks like), then record that they were not stopped; it leaves every image as it is."""

    def __init__(self, stall_at=1, seconds=60.0):
        self.calls, self.stall_at, self.seconds, self.finished_stalls = 0, stall_at, seconds, 0

    def __call__(self, model, x, y):
        self.calls += 1
        if self.calls >= self.stall_at:
            for _ in range(int(self.seconds / 0.01)):
                time.sleep(0.01)
            self.finished_stalls += 1
        return x

    def __repr__(self):
        return "Stalls()"


def test_deadline_raises_in_the_block_at_its_time_and_leaves_no_alarm_behind():
    handler = signal.getsignal(signal.SIGALRM)
    with pytest.raises(DeadlinePassed):
        with deadline(0.2):
            for _ in range(6000):  # a minute, unless cut
                time.sleep(0.01)
    with deadline(60.0):  # a block that ends in time: nothing raised, then or later
        pass
    time.sleep(0.3)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == handler
    with deadline(None), deadline(float("inf")):  # no budget: uncut, no timer
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_row_running_past_the_time_left_is_cut_and_the_table_goes_on(net_and_data, monkeypatch):
    """A prediction too low (AutoAttack's, on a GPU it never ran on) must not carry the table past its budget:
    the call is cut when the time left runs out; a chunked row keeps the chunks it finished."""
    net, x, y = net_and_data
    te = TimedEvaluation(x, y, left=lambda: 7.0, batch_size=64, margin_s=5.0)  # 2 s to spend
    te.clean("m", net)
    monkeypatch.setattr(te, "predict", lambda *a, **k: 0.0)  # every chunk is predicted to fit
    net = copy.deepcopy(net).train()  # a model left in train mode: evaluated in eval mode, given back as it was
    stalls = Stalls()
    assert te.row("m", net, "slow", stalls) is None
    assert stalls.calls == 1 and stalls.finished_stalls == 0
    assert te.skipped == ["m/slow (cut at the time budget)"] and te.reports["m"].rows == []
    assert net.training and all(m.training for m in net.modules())  # its modes as they were
    assert torch.is_grad_enabled()

    later = Stalls(stall_at=2)  # its first 16-image chunk returns at once, the second stalls
    row = te.row("m", net, "chunked", later, n=48, chunk=16)
    assert later.calls == 2 and later.finished_stalls == 0
    assert row is not None and row.n == 16 and row.clean == pytest.approx(16 / 16)  # the first 16 are correct
    assert row.robust == pytest.approx(1.0)  # Stalls returns x: the clean images
    assert te.skipped[-1] == "m/chunked: images 16-48 (cut at the time budget)"
    calls = te.reports["m"].meta["calls"]
    assert [c["images"] for c in calls["slow"]] == [64] and calls["slow"][0]["cut"]
    assert [(c["images"], c.get("cut", False)) for c in calls["chunked"]] == [(16, False), (16, True)]
    forced = Stalls(seconds=2.5)  # a required row runs past the time left: never cut
    assert te.row("m", net, "forced", forced, required=True).n == 64 and forced.finished_stalls == 1
    assert te.row("m", net, "ok", Counted(_pgd())).n == 64  # no alarm left over from the cuts


def test_the_reference_autoattack_is_cut_inside_its_own_loops(net_and_data, monkeypatch):
    """pyautoattack runs minutes on the CPU here: the cut reaches into its loops (nothing there swallows it)."""
    pytest.importorskip("pyautoattack")
    from multiteach.evaluation import AutoAttack

    net, x, y = net_and_data
    te = TimedEvaluation(x, y, left=lambda: 7.0, batch_size=64, margin_s=5.0)  # 2 s to spend (AA: ~1.5 min)
    te.clean("m", net)
    monkeypatch.setattr(te, "predict", lambda *a, **k: 0.0)
    assert te.row("m", net, "autoattack", AutoAttack(), n=24) is None
    assert te.skipped == ["m/autoattack (cut at the time budget)"]


def test_a_failing_optional_row_is_skipped_with_its_error_and_a_required_one_raises(net_and_data):
    net, x, y = net_and_data
    te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=64, margin_s=5.0)
    te.clean("m", net)
    assert te.row("m", net, "boom", Counted(_pgd(), fail_at=1)) is None
    assert te.skipped == ["m/boom (RuntimeError: kaboom)"]
    # a chunked row failing in its second chunk drops the first one too
    assert te.row("m", net, "boom2", Counted(_pgd(), fail_at=2), n=32, chunk=16) is None
    assert te.skipped == ["m/boom (RuntimeError: kaboom)", "m/boom2 (RuntimeError: kaboom)"]
    assert te.reports["m"].rows == []
    with pytest.raises(RuntimeError, match="kaboom"):
        te.row("m", net, "boom3", Counted(_pgd(), fail_at=1), required=True)
    assert len(te.skipped) == 2
    assert te.row("m", net, "ok", Counted(_pgd())).n == 64  # the table goes on

def test_a_latency_bound_attack_is_predicted_as_arithmetic_plus_fixed_steps_then_from_its_own_chunks(
        net_and_data, monkeypatch):
    """AutoAttack's cost: a fixed part (sequential steps at a single-image pass's latency) that a call pays
    whatever its size, plus arithmetic per image; a chunk runs as one call; once a chunk ran on a model, the
    prediction for that model is scaled to match it. Each model has its own rates."""
    ev = importlib.import_module("multiteach.evaluation")
    net, x, y = net_and_data
    te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=16, margin_s=5.0)
    te.clean("m", net)
    te.row("m", net, "pgd", Counted(_pgd()))  # measures this model's arithmetic rate
    seconds, passes = te._passes["m"]
    sizes = []
    slow = Counted(_pgd(), on_call=lambda calls: None)
    slow.attack = lambda model, xb, yb: sizes.append(len(yb)) or xb
    monkeypatch.setattr(ev, "attack_latency_steps", lambda a: 1000.0 if a is slow else 0.0)
    latency = te.latency("m", net)
    assert 0 < latency < 10
    assert "latency_s" not in te.reports["m"].meta  # measured, but written only by a latency-bound row
    per_image = 2 * seconds / passes  # _pgd() takes 2 steps
    assert te.predict(slow, 64, "m") == pytest.approx(64 * per_image + 1000 * latency)
    assert te.predict(slow, 16, "m") == pytest.approx(16 * per_image + 1000 * latency)  # the fixed part stays
    row = te.row("m", net, "slow", slow, n=48, chunk=32)
    assert row is not None and row.n == 48 and sizes == [32, 16]  # one call per chunk, not per batch of 16
    assert te.reports["m"].meta["latency_s"] == latency  # the prediction's fixed part, kept beside its rows
    measured, guessed = te._per_attack[("m", id(slow))][1]
    assert guessed == pytest.approx(48 * per_image + 2000 * latency)
    assert te._passes["m"] == [seconds, passes]  # a latency-bound row is no measure of the arithmetic rate
    assert te.predict(slow, 48, "m") == pytest.approx(measured * (48 * per_image + 1000 * latency) / guessed)

    te.clean("other", net)  # another model: its own latency, no scaling learnt on "m"
    te._latency_s["other"] = 2 * latency
    per_pass = max(te._guess_s["other"], seconds / passes)  # its clean-pass guess, or "m"'s rate if larger
    assert te.predict(slow, 16, "other") == pytest.approx(16 * 2 * per_pass + 2000 * latency)


def test_a_latency_bound_row_runs_the_most_images_that_fit_in_one_call(net_and_data, monkeypatch):
    """Each call of a latency-bound attack pays its fixed part again: when all n do not fit, the largest offered
    size that does runs as one call (the reference offers twentieths), not halves then quarters, which on the
    H200 covered 750 of 1,000 images in 118.6 s (RESULTS.md, run 4) where one call of 1,000 took 85 s (run 2)."""
    ev = importlib.import_module("multiteach.evaluation")
    net, x, y = net_and_data
    example = importlib.import_module("tests.test_example").load("mtard_cifar")
    assert example._chunks(1000) == tuple(range(1000, 0, -50)) and example._chunks(3) == (3, 2, 1)
    clock = [0.0]
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    sizes = []
    slow = Counted(_pgd())
    slow.attack = lambda model, xb, yb: sizes.append(len(yb)) or xb
    te = TimedEvaluation(x, y, left=lambda: 50.0 - clock[0], batch_size=16, margin_s=5.0)
    te.clean("m", net)
    # 10 s a call plus 1 s an image, as measured: 45 s to spend fit 35 images; then 10 s left fit none
    monkeypatch.setattr(te, "predict", lambda attack, n, model_name=None: 10.0 + n)
    monkeypatch.setattr(te, "latency", lambda *a: 0.01)
    monkeypatch.setattr(ev, "attack_latency_steps", lambda a: 1000.0 if a is slow else 0.0)

    def tick(calls):
        clock[0] += 10.0 + sizes[-1]
    slow.on_call = tick
    row = te.row("m", net, "slow", slow, n=60, chunk=example._chunks(60))
    assert sizes == [33] and row.n == 33  # twentieths of 60: 60, 57, ..., 36, 33: the largest under 35
    assert te.skipped == ["m/slow: images 33-60 (no time left)"]
    # each call in the report beside its prediction (what a GPU run's eval.json keeps for recalibrating)
    assert te.reports["m"].meta["calls"]["slow"] == [{"images": 33, "predicted_s": 43.0, "seconds": 43.0}]
    # halves and quarters (the reference's choice until run 4) cover fewer images
    sizes.clear()
    clock[0] = 0.0
    te.row("m", net, "halves", slow, n=60, chunk=(60, 30, 15))
    assert sizes == [30] and clock[0] == 40.0


def test_time_predictions_follow_the_measured_rate_once_and_a_larger_model_keeps_its_own_guess(
        net_and_data, monkeypatch):
    """On a fake clock (each attack call costs 1 ms per image and gradient pass): a chunked row whose first guess
    was 2x too fast predicts its next chunk right (the rate it feeds is not corrected a second time by the
    attack's own ratio), and a model whose clean pass says it is 10x slower is not priced, before its first
    gradient row, at the rate measured on a smaller model."""
    ev = importlib.import_module("multiteach.evaluation")
    net, x, y = net_and_data
    clock, per_pass = [0.0], 1e-3
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def costs(attack):
        def tick(calls):
            clock[0] += 16 * attack.steps * per_pass  # batches of 16
        attack.on_call = tick
        return attack

    te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=16, margin_s=5.0)
    te.clean("small", net)
    te._guess_s["small"] = per_pass / 2
    pgd = costs(Counted(_pgd()))
    assert te.predict(pgd, 16, "small") == pytest.approx(16 * 2 * per_pass / 2)
    te.row("small", net, "pgd", pgd, n=32, chunk=16)
    assert pgd.calls == 2 and te.predict(pgd, 16, "small") == pytest.approx(16 * 2 * per_pass)

    te.clean("big", net)
    te._guess_s["big"] = 10 * per_pass
    assert te.predict(pgd, 16, "big") == pytest.approx(16 * 2 * 10 * per_pass)  # not "small"'s 1 ms
    te._guess_s["big"] = per_pass / 10  # a clean pass that flatters it: the measured rate is the floor
    assert te.predict(pgd, 16, "big") == pytest.approx(16 * 2 * per_pass)


def test_reported_figures_run_without_tf32_and_a_tf32_table_says_so(net_and_data):
    """cuDNN runs fp32 convolutions in TF32 by default on recent GPUs: an fp32 figure must turn it off (and
    restore the user's setting); a table that allows TF32 labels itself and its strict-fp32 check row."""
    net, x, y = net_and_data
    seen = []

    def spy(model, xb, yb):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return xb

    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    correct_mask(net, x, y, spy)
    correct_mask(net, x, y, spy, tf32=True)
    assert seen == [(False, False), (True, True)]
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before
    torch.set_float32_matmul_precision("medium")  # a user's bf16 matmuls come back as they were
    try:
        correct_mask(net, x, y, spy)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before[1])
    assert mt.evaluate(net, x, y, {"spy": spy}).table().title.endswith("(fp32, eval mode)")
    te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=64, tf32=True)
    te.clean("m", net)
    seen.clear()
    te.row("m", net, "fast", spy)
    te.row("m", net, "check", spy, tf32=False)
    assert seen == [(True, True), (False, False)]
    rows = te.reports["m"].rows
    assert "(fp32)" in rows[1].settings and "fp32" not in rows[0].settings
    assert "TF32 allowed" in te.reports["m"].table().title
    # the check row's clean half too is strict fp32 (not the table's TF32 clean pass): a W-Robust of one precision
    flags = []
    probe = torch.nn.Sequential(net)
    probe.register_forward_pre_hook(lambda m, i: flags.append(torch.backends.cudnn.allow_tf32))
    te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=len(y), tf32=True)
    te.clean("p", probe)
    flags.clear()
    te.row("p", probe, "fast", spy)
    assert flags == [True]  # the attacked images; the clean half is the table's clean pass
    flags.clear()
    te.row("p", probe, "check", spy, tf32=False)
    assert flags == [False, False]  # the attacked images and their clean pass, both strict fp32

    def fails_on_the_clean_pass(m, i):  # e.g. out of memory: the optional row is skipped, the table goes on
        if len(flags) == 2:
            raise RuntimeError("CUDA out of memory")

    probe.register_forward_pre_hook(fails_on_the_clean_pass)
    flags.clear()
    assert te.row("p", probe, "check again", spy, tf32=False) is None
    assert te.skipped == ["p/check again (RuntimeError: CUDA out of memory)"] and len(te.reports["p"].rows) == 2


def test_tf32_switches_through_the_new_precision_api_where_the_user_set_it(net_and_data):
    """torch >= 2.9: once a user sets ``torch.backends.fp32_precision``, the legacy getters raise ("mix of the
    legacy and new APIs"); a table must still switch TF32 off (and back on) and restore the user's settings."""
    if not hasattr(torch.backends.cudnn, "conv") or not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision API")
    net, x, y = net_and_data
    flags = [(torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"),
             (torch.backends.cudnn, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision")]
    before = [getattr(o, n) for o, n in flags]
    seen = []

    def spy(model, xb, yb):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
        return xb

    try:
        torch.backends.fp32_precision = "tf32"  # a fresh process's user: the global setting, backends inheriting it
        torch.backends.cuda.matmul.fp32_precision = "none"
        with pytest.raises(RuntimeError, match="legacy and new"):
            torch.get_float32_matmul_precision()
        set_by_user = [getattr(o, n) for o, n in flags]
        correct_mask(net, x, y, spy)
        correct_mask(net, x, y, spy, tf32=True)
        assert seen == [("ieee", "ieee"), ("tf32", "tf32")]
        assert [getattr(o, n) for o, n in flags] == set_by_user
    finally:
        for (o, n), value in zip(flags, before):
            setattr(o, n, value)
    torch.get_float32_matmul_precision()  # the legacy API usable again for the other tests



# ----------------------------------------------------------------------------- 5. KL reduction option
TEACHERS = {"mtard": 2, "baseline": 1, "baseline_mt": 2, "mtard3": 3}


def _recipe(preset, nets, classes, **kw):
    student, *teachers = (copy.deepcopy(n) for n in nets)
    return PRESETS[preset].fn(student, *[mt.Teacher(t) for t in teachers], num_classes=classes, steps=2, **kw)


@pytest.mark.parametrize("preset", list(TEACHERS))
def test_batchmean_is_num_classes_times_the_default_mean(preset):
    classes = 7  # not 10, so the factor is the class count and not a constant
    torch.manual_seed(0)
    nets = [tiny_net(classes) for _ in range(1 + TEACHERS[preset])]
    g = torch.Generator().manual_seed(5)
    x, y = 0.1 + 0.8 * torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, classes, (8,), generator=g)

    assert inspect.signature(PRESETS[preset].fn).parameters["reduction"].default == "mean"
    outs = {}
    for reduction in (None, "mean", "batchmean"):
        recipe = _recipe(preset, nets, classes, **({"reduction": reduction} if reduction else {}))
        want = reduction or "mean"
        assert [b.loss.reduction for b in recipe.branches] == [want] * TEACHERS[preset]
        torch.manual_seed(3)  # the same PGD starts for every recipe
        outs[reduction] = recipe(x, y).losses
    assert len(outs[None]) == TEACHERS[preset] and torch.isfinite(outs[None]).all()
    assert (outs[None] > 0).all()
    torch.testing.assert_close(outs["mean"], outs[None], rtol=0, atol=0)
    torch.testing.assert_close(outs["batchmean"], classes * outs[None], rtol=1e-5, atol=0)


def test_validation_attacks_the_threat_the_recipe_trains_for(monkeypatch, tmp_path):
    """An L2 teacher is selected on L2 robustness (PGD at its eps, step eps/4), not on L-inf 8/255; an L-inf
    recipe keeps PGD_SAT (step 2/255); a recipe without an attack falls back to L-inf 8/255."""
    from multiteach.engine.validator import threat_model

    l2 = mt.presets.sat(tiny_net(), norm="L2", eps=0.5, alpha=0.125, steps=2)
    assert threat_model(l2) == ("L2", 0.5)
    assert threat_model(_mtard()) == ("Linf", pytest.approx(8 / 255))
    assert threat_model(mt.presets.natural(tiny_net())) == ("Linf", pytest.approx(8 / 255))
    seen = []
    real = mt.PGD.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append((self.norm, self.eps, self.alpha))

    monkeypatch.setattr(mt.PGD, "__init__", spy)
    val = TensorLoader(synthetic(16, seed=1), 16)
    trainer = mt.Trainer(l2, TensorLoader(synthetic(32, seed=0), 16), _cfg(epochs=1, eval_pgd_steps=2),
                         val_loader=val, run_dir=tmp_path)
    seen.clear()
    trainer.evaluate()
    assert seen == [("L2", 0.5, 0.125)]
    mt_validator.clean_and_pgd(tiny_net(), val, steps=1)
    assert seen[-1] == ("Linf", 8 / 255, 2 / 255)  # PGD_SAT's step, exactly


class Draws:
    """An attack (its settings: ``label``) that records the first random number it draws and leaves the images
    as they are: what a random start sees of the random stream."""

    steps = 1

    def __init__(self, label):
        self.label, self.seen = label, []

    def __call__(self, model, x, y):
        self.seen.append(torch.rand(1).item())
        return x

    def __repr__(self):
        return f"Draws({self.label})"


def test_each_seeded_row_draws_its_random_starts_from_its_own_stream(net_and_data):
    """With a seed, a row's random starts do not depend on what ran before it (H200 runs 4 and 5 read one
    teacher's PGD_TRADES 0.15 apart, the student's AutoAttack having run before it in run 4 only), in
    TimedEvaluation and evaluate alike; the stream is named by the attack's settings, so a check row of the same
    attack under another name (pgd_sat_fp32) draws the same starts; the global stream is left as it was; without
    a seed, rows draw from the global stream as before."""
    net, x, y = net_and_data

    def timed(order, seed):
        te = TimedEvaluation(x, y, left=lambda: 1e9, batch_size=64, seed=seed)
        te.clean("m", net)
        attacks = {name: Draws(name.removesuffix("_fp32")) for name in order}
        for name in order:
            te.row("m", net, name, attacks[name])
        return {name: a.seen for name, a in attacks.items()}

    torch.manual_seed(123)
    before = torch.get_rng_state()
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)  # torch.manual_seed's seed for a CUDA not yet used
    seed_all = tracker.get_calls()[1] if tracker is not None and not torch.cuda.is_initialized() else None
    queued = seed_all[0] if seed_all else None
    a, b = timed(["pgd_sat", "pgd_trades"], 0), timed(["fgsm", "pgd_trades", "pgd_sat"], 0)
    assert torch.equal(torch.get_rng_state(), before)  # forked, not consumed
    if queued is not None:  # nor replaced by a row's seed, to take effect when CUDA starts
        assert tracker.get_calls()[1][0] is queued
    assert a["pgd_trades"] == b["pgd_trades"] and a["pgd_sat"] == b["pgd_sat"]
    assert a["pgd_sat"] != a["pgd_trades"]  # each attack its own stream, not one reseeded stream
    assert timed(["fgsm", "pgd_sat_fp32"], 0)["pgd_sat_fp32"] == a["pgd_sat"]  # the same attack, the same starts
    assert timed(["pgd_sat"], 1)["pgd_sat"] != a["pgd_sat"]  # the seed names the streams
    unseeded = timed(["fgsm", "pgd_sat"], None)
    assert unseeded["pgd_sat"] != unseeded["fgsm"] and not torch.equal(torch.get_rng_state(), before)

    def plain(order):
        attacks = {name: Draws(name) for name in order}
        mt.evaluate(net, x, y, attacks, batch_size=64, seed=0)
        return {name: a.seen for name, a in attacks.items()}

    assert plain(["pgd_sat", "pgd_trades"])["pgd_trades"] == plain(["pgd_trades"])["pgd_trades"] == a["pgd_trades"]
