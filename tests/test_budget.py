"""Wall-clock budgets: TimeBudget, EpochPlanner and the budgeted Trainer, all driven by fake clocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import multiteach as mt
from multiteach.budget import EpochPlanner, TimeBudget
from multiteach.config import ExperimentConfig
from multiteach.data import TensorLoader, synthetic
from tests.conftest import SignalAtStep, tiny_net


class FakeClock:
    """A clock that only moves when the test moves it."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------- TimeBudget


def test_stages_share_the_time_left_before_the_reserve():
    clk = FakeClock()
    b = TimeBudget(100, {"a": 1, "b": 3}, reserve_s=20, clock=clk)
    assert b.allot("a") == pytest.approx((100 - 20) * 1 / 4)  # 20
    clk.t = 20.0
    assert b.finish("a") == pytest.approx(20.0)
    assert b.allot("b") == pytest.approx((100 - 20 - 20) * 3 / 3)  # 60: the whole rest before the reserve
    clk.t = 80.0
    b.finish("b")
    assert b.left() == pytest.approx(20.0)  # exactly the reserve is left


def test_a_stage_given_at_most_some_seconds_is_allotted_those():
    b = TimeBudget(100, {"a": 1, "b": 3}, reserve_s=20, clock=FakeClock())
    assert b.allot("a", at_most=5) == 5 and b.allotted["a"] == 5  # under its share of 20: the cap, recorded
    assert b.allot("b", at_most=1000) == pytest.approx(80)  # over its share (the rest before the reserve): that



def test_a_hard_deadline_before_the_budgets_end_shortens_the_time_left_but_not_the_names():
    """A call with less time than its budget (a device call's limit, a scheduler's): the stages and the reserve
    fit the deadline, the stages' nominal shares (their cache names) stay the budget's."""
    clk = FakeClock(1000.0)
    plain = TimeBudget(540, {"a": 1, "b": 3}, reserve_s=40, clock=clk)
    b = TimeBudget(540, {"a": 1, "b": 3}, reserve_s=40, clock=clk, deadline=1000.0 + 200)
    assert b.nominal("a") == plain.nominal("a") == pytest.approx(125.0)
    assert b.left() == pytest.approx(200.0) and plain.left() == pytest.approx(540.0)
    assert b.allot("a") == pytest.approx((200 - 40) / 4)
    clk.t += 40.0
    b.finish("a")
    assert b.allot("b", at_most=500) == pytest.approx(200 - 40 - 40)  # the rest before the reserve, not the cap
    clk.t += 120.0
    assert b.left() == pytest.approx(40.0)  # the reserve, before the deadline
    assert b.summary()["deadline_in_s"] == 200.0 and "deadline_in_s" not in plain.summary()
    far = TimeBudget(100, {"a": 1}, clock=clk, deadline=clk.t + 1000)  # a deadline after the budget's end: the budget
    assert far.left() == pytest.approx(100.0)


def test_the_last_stage_may_hold_back_less_than_the_reserve_under_the_same_name():
    """Before an evaluation without its slowest row the last stage keeps back less than the reserve the budget
    was sized for, and gets the difference; its nominal share (its name) stays."""
    clk = FakeClock()
    b = TimeBudget(540, {"a": 1, "b": 3}, reserve_s=160, clock=clk)
    assert b.allot("a") == pytest.approx(380 / 4)
    clk.t = 95.0
    b.finish("a")
    assert b.allot("b", hold_s=60) == pytest.approx(540 - 95 - 60)
    assert b.nominal("b") == pytest.approx(380 * 3 / 4)

def test_an_overrun_shortens_the_later_stages_and_keeps_the_deadline():
    clk = FakeClock()
    b = TimeBudget(120, {"a": 1, "b": 1, "c": 2}, clock=clk)
    assert b.allot("a") == pytest.approx(30.0)
    clk.t = 30.0  # on time
    b.finish("a")
    assert b.allot("b") == pytest.approx(90 * 1 / 3)  # 30
    clk.t = 75.0  # b took 45 s instead of 30: 15 s over
    assert b.finish("b") == pytest.approx(45.0)
    c = b.allot("c")
    assert c == pytest.approx(60.0 - 15.0)  # c's planned 60 s minus b's overrun
    assert clk.t + c == pytest.approx(120.0)  # the run still ends at the deadline

    # the same with a reserve: the overrun never eats into it
    clk = FakeClock()
    b = TimeBudget(100, {"a": 1, "b": 3}, reserve_s=20, clock=clk)
    assert b.allot("a") == pytest.approx(20.0)
    clk.t = 50.0  # 30 s over
    b.finish("a")
    assert b.allot("b") == pytest.approx(60.0 - 30.0)
    assert clk.t + 30.0 + b.reserve_s == pytest.approx(100.0)


def test_a_stages_nominal_share_does_not_move_with_the_time_the_others_took():
    """What names a budgeted stage (its cache entry): its share of the budget less the reserve, the same whether
    the stages before it ran long, were skipped, or the setup took longer; another budget or split moves it."""
    clk = FakeClock(5.0)
    b = TimeBudget(100, {"a": 1, "b": 3}, reserve_s=20, clock=clk, start=0.0)
    assert b.nominal("a") == pytest.approx(20.0) and b.nominal("b") == pytest.approx(60.0)
    b.skip("a")
    clk.t = 50.0
    assert b.allot("b") == pytest.approx(30.0) and b.nominal("b") == pytest.approx(60.0)
    assert TimeBudget(200, {"a": 1, "b": 3}, reserve_s=20, clock=clk).nominal("b") == pytest.approx(135.0)
    assert TimeBudget(100, {"a": 1, "b": 1}, reserve_s=20, clock=clk).nominal("b") == pytest.approx(40.0)
    with pytest.raises(KeyError, match="unknown stage 'c'"):
        b.nominal("c")


def test_a_skipped_stage_gives_its_share_to_the_others():
    clk = FakeClock()
    b = TimeBudget(120, {"a": 1, "b": 1, "c": 2}, clock=clk)
    b.skip("a")
    assert b.allot("b") == pytest.approx(120 * 1 / 3)  # 40 instead of 30
    clk.t = 40.0
    b.finish("b")
    assert b.allot("c") == pytest.approx(80.0)
    with pytest.raises(ValueError, match="already started"):
        b.allot("a")  # a skipped stage cannot be started


def test_allot_never_gives_less_than_a_second():
    clk = FakeClock()
    b = TimeBudget(10, {"a": 1, "b": 1}, clock=clk)
    clk.t = 50.0  # 40 s past the deadline
    assert b.left() == pytest.approx(-40.0)
    assert b.allot("a") == 1.0
    clk = FakeClock()
    b = TimeBudget(100, {"a": 1}, reserve_s=20, clock=clk)
    clk.t = 90.0  # 10 s left, less than the 20 s reserve
    assert b.allot("a") == 1.0
    assert b.allotted["a"] == 1.0


def test_start_and_clock_of_a_budget():
    clk = FakeClock(5.0)
    b = TimeBudget(100, {"a": 1}, clock=clk)
    assert b.start == 5.0 and b.elapsed() == 0.0 and b.left() == 100.0
    b = TimeBudget(100, {"a": 1}, clock=clk, start=-5.0)  # started 10 s ago
    assert b.elapsed() == pytest.approx(10.0) and b.left() == pytest.approx(90.0)
    assert b.allot("a") == pytest.approx(90.0)


def test_unknown_and_duplicate_stages_are_errors():
    clk = FakeClock()
    b = TimeBudget(100, {"a": 1, "b": 1}, clock=clk)
    with pytest.raises(KeyError, match="unknown stage 'x'"):
        b.allot("x")
    b.allot("a")
    with pytest.raises(ValueError, match="already started"):
        b.allot("a")  # while it runs
    b.finish("a")
    with pytest.raises(ValueError, match="already started"):
        b.allot("a")  # after it ran
    with pytest.raises(KeyError):
        b.finish("b")  # never started
    with pytest.raises(ValueError, match="> 0 seconds"):
        TimeBudget(0, {"a": 1}, clock=clk)
    with pytest.raises(ValueError, match="positive weights"):
        TimeBudget(10, {}, clock=clk)
    with pytest.raises(ValueError, match="positive weights"):
        TimeBudget(10, {"a": 1, "b": 0}, clock=clk)


def test_summary_lists_the_finished_and_skipped_stages():
    clk = FakeClock()
    b = TimeBudget(100, {"a": 1, "b": 1, "c": 2}, reserve_s=20, clock=clk)
    b.skip("b")
    assert b.allot("a") == pytest.approx(80 / 3)
    clk.t = 30.04
    b.finish("a")
    b.allot("c")  # still running: not in the summary yet
    clk.t = 31.26
    assert b.summary() == {
        "budget_s": 100.0,
        "elapsed_s": 31.3,
        "stages": {"b": {"allotted_s": 0.0, "spent_s": 0.0},
                   "a": {"allotted_s": round(80 / 3, 1), "spent_s": 30.0}},
    }
    b.finish("c")
    s = b.summary()["stages"]["c"]
    assert s["allotted_s"] == round((100 - 30.04 - 20) * 2 / 2, 1) and s["spent_s"] == pytest.approx(1.2)


# ---------------------------------------------------------------- EpochPlanner


def _planner(clk, **kw):
    calls = []
    base = dict(seconds=100.0, steps_per_epoch=10, skip=4, measure=6, fraction=0.9, clock=clk,
                sync=lambda: calls.append(clk()))
    p = EpochPlanner(**{**base, **kw})
    p.begin()
    return p, calls


def _steps(p, clk, first, last, dt, spe=10):
    """Steps first..last (1-based global step numbers), each taking dt seconds; the non-None plans."""
    plans = {}
    for i in range(first, last + 1):
        clk.t += dt
        r = p.on_step(i / spe)
        if r is not None:
            plans[i] = r
    return plans


def test_the_plan_comes_from_the_measured_steps():
    clk = FakeClock()
    p, syncs = _planner(clk)
    clk.t += 2.5  # a 3 s first step (autotuning), then 0.5 s steps
    plans = _steps(p, clk, 1, 10, 0.5)
    # skip at step 4 (t = 4.5), measured at step 10 (t = 7.5): 0.5 s/step
    # left = 100 * 0.9 - 7.5 = 82.5 s; floor(1.0 + 82.5 / (0.5 * 10)) = floor(17.5) = 17
    assert plans == {10: 17}
    assert p.step_s == pytest.approx(0.5) and p.epochs == 17
    assert syncs == [4.5, 7.5]  # sync at the two timing points, before the clock is read
    assert _steps(p, clk, 11, 60, 0.5) == {}  # the plan is made once
    assert len(syncs) == 2


@pytest.mark.parametrize("kw, expected", [
    (dict(max_epochs=10), 10),  # 17 clipped to max
    (dict(min_epochs=30), 30),  # 17 raised to min
    (dict(min_epochs=2, max_epochs=40), 17),
    (dict(seconds=5.0), 3),  # time already up at step 10: the epoch in progress (2.5 -> 3) is finished
    (dict(epochs=7), 7),  # a resumed stage keeps the plan it made
])
def test_the_plan_is_clipped(kw, expected):
    clk = FakeClock()
    spe = 4 if "seconds" in kw else 10
    p, syncs = _planner(clk, steps_per_epoch=spe, **kw)
    clk.t += 2.5
    plans = _steps(p, clk, 1, 10, 0.5, spe=spe)
    if "seconds" in kw:
        # left = 5 * 0.9 - 7.5 = -3; floor(2.5 - 3 / (0.5 * 4)) = 1 -> min 1 -> at least ceil(2.5) = 3
        assert math.floor(2.5 + (5 * 0.9 - 7.5) / (0.5 * 4)) == 1
    assert plans == {10: expected}
    assert len(syncs) == 2


def _planned(clk, **kw):
    """A planner after 20 steps of 0.5 s (3 s for the first) at 10 steps per epoch: the plan is 17."""
    p, _ = _planner(clk, **kw)
    clk.t += 2.5
    plans = _steps(p, clk, 1, 20, 0.5)
    assert plans == {10: 17} and clk.t == pytest.approx(12.5)
    return p


def test_on_epoch_end_keeps_the_plan_when_on_time():
    clk = FakeClock()
    p = _planned(clk)
    # per epoch (12.5 - 4.5) / 16 * 10 = 5 s; left 87.5 s: 2 + 17 = 19 epochs would fit, the plan stays 17
    assert p.on_epoch_end(2, 17) == 17
    assert p.on_epoch_end(17, 17) == 17  # done
    assert p.on_epoch_end(20, 17) == 17


def test_on_epoch_end_shortens_the_plan_when_the_steps_got_slower():
    clk = FakeClock()
    p = _planned(clk)
    _steps(p, clk, 21, 30, 2.0)  # 4x slower: t = 32.5
    # per epoch (32.5 - 4.5) / (30 - 4) * 10 = 10.77 s; left 67.5 s; 3 + floor(6.27) = 9
    assert p.on_epoch_end(3, 17) == 9
    # not even half an epoch left: stop after the epoch just done
    clk.t = 100 - 5.0  # per epoch (95 - 4.5) / 26 * 10 = 34.8 s; 5 s left
    assert p.on_epoch_end(3, 17) == 3
    # more than half an epoch left, less than one: one more epoch
    clk.t = 80.0  # per epoch (80 - 4.5) / 26 * 10 = 29.0 s; 20 s left
    assert p.on_epoch_end(3, 17) == 4


def test_on_epoch_end_stops_when_the_time_is_up():
    clk = FakeClock()
    p = _planned(clk)
    clk.t = 100.0
    assert p.on_epoch_end(2, 17) == 2
    clk.t = 250.0
    assert p.on_epoch_end(5, 17) == 5


def test_on_epoch_end_never_lengthens_the_plan():
    clk = FakeClock()
    p = _planned(clk)
    for planned in (1, 3, 5, 17):
        for t in (12.5, 20.0, 50.0, 99.0, 150.0):
            clk.t = t
            for done in range(0, planned + 1):
                assert p.on_epoch_end(done, planned) <= planned
    clk.t = 12.5
    assert p.on_epoch_end(2, 5) == 5  # 19 epochs would fit: a plan of 5 stays 5


def test_on_epoch_end_before_the_warm_up_keeps_the_plan():
    clk = FakeClock()
    p, syncs = _planner(clk)
    _steps(p, clk, 1, 4, 10.0)  # very slow, but only the warm-up steps ran
    assert p.on_epoch_end(1, 50) == 50
    assert syncs == [40.0]


# ---------------------------------------------------------------- the budgeted Trainer

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU steps gain nothing from intra-op threads, and lose a lot when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPE = 8  # 64 images, batch 8, drop_last: 8 steps per epoch (batch 8 keeps a step cheap on 2 CPU cores)
LR = 0.05


def _loader():
    return TensorLoader(synthetic(64, seed=0), 8, shuffle=True, augment=True, drop_last=True, seed=0)


def _val():
    return TensorLoader(synthetic(32, seed=1), 32)


def _cfg(budget, **kw):
    base = dict(epochs=20, time_budget_s=budget, batch_size=8, lr=LR, schedule="cosine", milestones=[],
                warmup_epochs=0, log_every=1, progress=False, eval_every=100, eval_pgd_steps=2, device="cpu")
    return mt.TrainConfig(**{**base, **kw})


def _natural(seed=0):
    torch.manual_seed(seed)
    return mt.presets.natural(tiny_net())


def _trainer(run_dir, budget, *, extra=lambda step: 0.0, val=True, step_s=1.0, recipe=None, **kw):
    """A Trainer whose clock reads step_s seconds per optimizer step done (plus extra(step))."""
    box = {}

    def clock():
        t = box.get("trainer")
        step = t.global_step if t is not None else 0  # 0 while the Trainer is built (the planner begins there)
        return step * step_s + extra(step)

    trainer = mt.Trainer(recipe or _natural(), _loader(), _cfg(budget, **kw), val_loader=_val() if val else None,
                         run_dir=run_dir, clock=clock)
    box["trainer"] = trainer
    return trainer


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lrs(run_dir):
    return [(r["step"], r["lr"]) for r in _records(run_dir) if r["type"] == "step"]


def _cosine(plans, last):
    """The logged (step, lr) of steps 1..last under a cosine whose length is ``plans[k]`` epochs from step k on:
    a step's LR is computed before it, at global step - 1, from the epoch count in force then."""
    out, epochs = [], None
    for step in range(1, last + 1):
        epochs = plans.get(step, epochs)
        out.append((step, LR * 0.5 * (1 + math.cos(math.pi * min((step - 1) / (epochs * SPE), 1.0)))))
    return out


def _assert_lrs(run_dir, plans, last):
    got, want = _lrs(run_dir), _cosine(plans, last)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in want], rel=1e-6, abs=1e-12)


# At 1 s per step, with skip 8 and measure 24, a budget of 55 s gives:
#   epoch ends before the plan (steps 8, 16, 24) cut nothing: the time is not up, the rate not yet measured
#   step 32 (epoch 4.0, t = 32): 1 s/step; 55 * 0.92 - 32 = 18.6 s left: floor(4 + 18.6 / 8) = 6 epochs
#   every later epoch end: e + floor((55 - 8 e) / 8) = 6 -> kept. The run ends at 6 epochs, step 48.
PLAN_55 = {1: 20, 33: 6}


def test_a_budgeted_run_ends_after_the_planned_epochs(tmp_path):
    assert math.floor(4 + (55 * 0.92 - 32) / (1.0 * SPE)) == 6
    trainer = _trainer(tmp_path, 55)
    res = trainer.fit()
    assert res.status == "finished"
    assert res.epoch == 6 and res.global_step == 6 * SPE and trainer.cfg.epochs == 6
    assert trainer.planner.epochs == 6 and trainer.planner.step_s == pytest.approx(1.0)

    rows = _records(tmp_path)
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    # the schedule follows the plan: a cosine over 6 epochs once it is made, annealed at the end
    _assert_lrs(tmp_path, PLAN_55, 48)
    assert _lrs(tmp_path)[-1][1] < 0.01 * LR
    # eval_every is larger than the run: only the final epoch is validated, and it writes best.pt
    assert [r["epoch"] for r in epochs if "val_clean" in r] == [6]
    assert (tmp_path / "best.pt").is_file()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 6 and res.best["epoch"] == 6
    assert torch.load(tmp_path / "last.pt", weights_only=True)["planned_epochs"] == 6


def test_a_budget_larger_than_max_epochs_trains_max_epochs(tmp_path):
    trainer = _trainer(tmp_path, 10_000, val=False, epochs=4)  # the plan at step 32 is clipped to 4
    res = trainer.fit()
    assert res.status == "finished" and res.epoch == 4 and res.global_step == 4 * SPE
    assert trainer.planner.epochs == 4
    _assert_lrs(tmp_path, {1: 4}, 32)


def test_a_stall_cuts_only_the_epochs_it_took(tmp_path):
    # 1 s/step, budget 100 s: the plan at step 32 is floor(4 + (100 * 0.92 - 32) / 8) = 11 epochs, kept at the
    # ends of epochs 4 and 5 (e + floor((100 - 8 e) / 8) = 12).
    # Then the clock jumps 30 s after step 40 (a one-off stall): at the end of epoch 6 (step 48, t = 78) the
    # median of the last three epochs is still 8 s (8, 8, 38), 22 s are left: 6 + floor(22 / 8) = 8 epochs, and
    # epoch 8 ends at t = 94, inside the budget. (The average since the warm-up, (78 - 8) / 40 * 8 = 14 s an
    # epoch, would have planned 7 and left 14 s unused.)
    assert math.floor(4 + (100 * 0.92 - 32) / SPE) == 11
    assert 6 + math.floor((100 - 78) / SPE) == 8
    trainer = _trainer(tmp_path, 100, extra=lambda step: 30.0 if step > 40 else 0.0)
    res = trainer.fit()
    assert res.status == "finished"
    assert res.epoch == 8 and res.global_step == 8 * SPE and trainer.cfg.epochs == 8
    assert trainer.planner.epochs == 8  # the plan made at step 32 (11), shortened afterwards
    rows = _records(tmp_path)
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    assert [r["epoch"] for r in epochs if "val_clean" in r] == [8]  # the shortened last epoch is validated
    assert (tmp_path / "best.pt").is_file()
    _assert_lrs(tmp_path, {1: 20, 33: 11, 49: 8}, 64)  # re-annealed to the shorter plan
    assert torch.load(tmp_path / "last.pt", weights_only=True)["planned_epochs"] == 8


def test_a_lasting_slow_down_is_followed(tmp_path):
    # 1 s/step up to step 40, then 3 s/step. Epoch 6 ends at t = 64 (spans 8, 8, 24: median 8, 36 s left):
    # 6 + 4 = 10 epochs. Epoch 7 ends at t = 88 (spans 8, 24, 24: median 24, 12 s left, half an epoch): one more,
    # 8. The median follows the new rate two epochs after it starts. Epoch 8 ends at t = 112: with half an epoch
    # left the rule allows one more, and a 3x slower epoch overruns by the rest (the stage after absorbs it).
    trainer = _trainer(tmp_path, 100, val=False, extra=lambda step: 2.0 * max(step - 40, 0))
    res = trainer.fit()
    assert res.status == "finished" and res.epoch == 8 and trainer.planner.epochs == 8
    _assert_lrs(tmp_path, {1: 20, 33: 11, 49: 10, 57: 8}, 64)


def test_a_first_validation_slower_than_the_rest_costs_only_its_own_time():
    # H200 run 2's natural teacher: 23 epochs planned, the first validation (epoch 4, with its one-off
    # autotuning) made the average since the warm-up look 40% slower and cut the plan to 18 epochs, of which
    # 28.8 s of 35.3 were spent. Here 17 epochs of 5 s are planned in 100 s; as in the Trainer, a validation
    # runs after its epoch's re-plan (every 4 epochs and after the last one): 20 s the first time, 2 s later.
    clk = FakeClock()
    p = _planned(clk)  # 2 epochs done at t = 12.5
    plans, planned, e = {}, 17, 2
    while True:
        planned = plans[e] = p.on_epoch_end(e, planned)
        if e >= planned:
            break
        clk.t += (20.0 if e == 4 else 2.0 if e % 4 == 0 else 0.0) + 5.0
        e += 1
    # epoch 5 ends at t = 47.5, spans 5, 5, 25: the lower median 5 s, the 20 s excess left out as one-off;
    # 52.5 s left: 5 + 10 = 15 (in a Trainer, 46 timed steps by then, the average since the warm-up reads
    # (47.5 - 4.5) / 46 * 10 = 9.3 s an epoch and would cut to 5 + 5 = 10). Epoch 9 ends at t = 69.5 (spans 5, 5,
    # 25, 5, 5, 5, 7): 5 + 2/7 s an epoch, the later validation's 2 s spread over them; 30.5 s left: 9 + 5 = 14.
    assert [plans[k] for k in (2, 3, 4, 5, 8, 9, 14)] == [17, 17, 17, 15, 15, 14, 14]
    assert e == 14 and clk.t + 2.0 <= 100  # the last validation ends inside the budget too
    assert 9 + math.floor((100 - 69.5) / (5 + 2 / 7)) == 14


def test_the_time_up_at_the_end_of_an_epoch_stops_the_run(tmp_path):
    # as above, but a 100 s stall after step 40 puts the clock past the budget at the end of epoch 6
    trainer = _trainer(tmp_path, 100, extra=lambda step: 100.0 if step > 40 else 0.0)
    res = trainer.fit()
    assert res.status == "finished" and res.epoch == 6 and res.global_step == 6 * SPE
    epochs = [r for r in _records(tmp_path) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs if "val_clean" in r] == [6]
    assert (tmp_path / "best.pt").is_file()


def _stop_and_resume(cut_dir, budget, k, resume_budget="same"):
    trainer = _trainer(cut_dir, budget, val=False)
    trainer.recipe.forward = SignalAtStep(trainer.recipe.forward, k)
    res = trainer.fit()
    assert res.status.startswith("interrupted") and res.global_step == k
    ckpt = torch.load(cut_dir / "last.pt", weights_only=True)
    resumed = _trainer(cut_dir, budget if resume_budget == "same" else resume_budget, val=False,
                       recipe=_natural(seed=1))  # a fresh config: max epochs 20
    return ckpt, resumed, resumed.fit()


def test_a_resumed_run_keeps_its_plan(tmp_path):
    # SIGTERM at step 36: after the plan (step 32), in the middle of epoch 5. The uninterrupted run under the
    # same budget (test_a_budgeted_run_ends_after_the_planned_epochs) ends at 6 epochs, step 48.
    ckpt, resumed, res = _stop_and_resume(tmp_path, 55, 36)
    assert ckpt["planned_epochs"] == 6 and ckpt["global_step"] == 36 and ckpt["step_in_epoch"] == 4
    assert resumed.cfg.epochs == 6 and resumed.planner.epochs == 6
    assert res.status == "finished" and res.epoch == 6 and res.global_step == 48
    _assert_lrs(tmp_path, PLAN_55, 48)  # the same LR trace as the uninterrupted run


def test_a_budgeted_run_resumed_without_its_budget_keeps_its_plan(tmp_path):
    """The pipeline may go on as a later command without --budget: the run ends at its planned 6 epochs, its
    cosine over those, not restarted over the 20 the config allows (the LR would jump back up)."""
    ckpt, resumed, res = _stop_and_resume(tmp_path, 55, 36, resume_budget=None)
    assert ckpt["planned_epochs"] == 6 and resumed.planner is None and resumed.cfg.epochs == 6
    assert res.status == "finished" and res.epoch == 6 and res.global_step == 48
    _assert_lrs(tmp_path, PLAN_55, 48)


def test_a_run_stopped_before_its_plan_plans_after_the_resume(tmp_path):
    # Stopped at step 3, before any plan: last.pt holds no plan, and the resumed stage plans at its own
    # 8 + 24th step, step 35 (t = 35, 1 s/step; its budget counts from its construction, where this fake
    # clock reads 0): floor(35 / 8 + (60 * 0.92 - 35) / 8) = floor(4.375 + 2.525) = 6 epochs.
    ckpt, resumed, res = _stop_and_resume(tmp_path, 60, 3)
    assert ckpt["planned_epochs"] is None
    assert resumed.planner.epochs == math.floor(35 / SPE + (60 * 0.92 - 35) / SPE) == 6
    assert res.status == "finished" and res.epoch == 6 and res.global_step == 6 * SPE


def test_a_slow_start_does_not_cut_the_run_before_the_plan(tmp_path):
    # 1 s/step except steps 9..16 (3 s each: late autotuning), budget 100 s: the end of epoch 2 (t = 32) is
    # before the plan and the time is not up, so nothing is cut from a partial rate; the plan at step 32
    # (t = 48): (48 - 8) / 24 = 1.67 s/step, 92 - 48 = 44 s left: floor(4 + 44 / 13.3) = 7 epochs.
    trainer = _trainer(tmp_path, 100, val=False, extra=lambda step: 2.0 * min(max(step - 8, 0), 8))
    res = trainer.fit()
    assert res.status == "finished" and res.epoch == 7
    lrs = [lr for _, lr in _lrs(tmp_path)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # the LR never rises again


def test_planner_with_no_warm_up_steps():
    clk = FakeClock()
    p, _ = _planner(clk, skip=0, measure=6)
    plans = _steps(p, clk, 1, 6, 0.4)
    # timed from begin(): 0.4 s/step, left 90 - 2.4 = 87.6 s: floor(0.6 + 87.6 / 4) = floor(22.5) = 22
    assert plans == {6: 22}


# ---------------------------------------------------------------- the cache digest


def test_the_digest_ignores_the_time_left_but_not_the_stages_share_nor_the_epochs():
    def exp(**train):
        return ExperimentConfig(preset="natural", student={"model": "cifar_resnet18"}, train=train)

    plain = exp(epochs=30).digest()
    assert exp(epochs=30, time_budget_s=100.0).digest() == plain
    assert exp(epochs=30, time_budget_s=3600.0).digest() == plain
    assert exp(epochs=31, time_budget_s=100.0).digest() != plain
    assert exp(epochs=31).digest() != plain

    from multiteach.pipeline import cache_entry

    a, b = exp(epochs=30, time_budget_s=100.0), exp(epochs=30, time_budget_s=900.0)
    assert cache_entry(a, "cache") == cache_entry(b, "cache")
    assert cache_entry(a, "cache") != cache_entry(exp(epochs=40, time_budget_s=100.0), "cache")
    # the budget still reaches the trainer's config (only the digest ignores it)
    assert a.train.time_budget_s == 100.0 and a.model_dump()["train"]["time_budget_s"] == 100.0
    # a stage's nominal share of its command's budget names it: a 75-s budget's teacher is not a 540-s one's
    short, long = exp(epochs=30, stage_budget_s=20.0), exp(epochs=30, stage_budget_s=128.0, time_budget_s=100.0)
    assert len({plain, short.digest(), long.digest()}) == 3
    assert exp(epochs=30, stage_budget_s=128.0, time_budget_s=140.0).digest() == long.digest()


def test_digests_of_runs_written_before_stay_as_they_were():
    """Every cache entry and run folder is found by its digest: a new setting at its default must leave the
    digest of an older config as it was (this one's, as a5cc0f7 computed it), or every cache is orphaned."""
    cfg = ExperimentConfig(preset="sat", options={"steps": 5}, student={"model": "cifar_resnet18"},
                           data={"data_dir": None, "val_size": 1000},
                           train={"epochs": 30, "batch_size": 256, "lr": 0.2, "schedule": "cosine", "milestones": [],
                                  "ema_decay": 0.999, "time_budget_s": 100.0})
    assert cfg.digest() == "a052d74c6f8b44de"


def test_a_budgets_plan_moves_a_piecewise_schedules_milestones_to_the_same_shares(tmp_path):
    """200 epochs decayed at 100 and 150 planned as 20 decay at 10 and 15: a budget that cuts a piecewise run
    still anneals (the milestones would otherwise lie past its end: a constant LR)."""
    trainer = _trainer(tmp_path, 55, val=False, schedule="piecewise", milestones=[10, 15])
    res = trainer.fit()
    assert res.epoch == 6 and trainer.cfg.milestones == [3, 4]  # 10 * 6/20, 15 * 6/20 = 4.5 -> 4
    lrs = dict(_lrs(tmp_path))  # planned at step 33 (epoch 5, past both new milestones): 0.01 from there on
    assert lrs[32] == pytest.approx(LR) and lrs[33] == lrs[6 * SPE] == pytest.approx(LR * 0.01)
