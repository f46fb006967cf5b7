"""CIARD: one step equals the official step (eminentgu/CIARD CIARD.py, mtard_loss.robust_inner_loss_push) re-done
by hand: the student's KL terms with the teachers' temperatures, the push term on the clean teacher's errors
with its power-of-ten weight, the temperature update, and the robust teacher's own CE from epoch 50 on."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.ciard import MagnitudeMatch, PushLoss
from multiteach.presets import PRESETS
from multiteach.weighting import make_weighter
from tests.conftest import tiny_net
from tests.test_presets import batch, hand_pgd

STEPS = 3  # attack steps: the formula is the same at 10, and the CPU is small
BATCH = 9  # a batch on which the clean teacher is right on 3 of the 8 x' and wrong on 5


def kl_loss(a, b):
    """The code's elementwise kl_loss(log q, p) = -log q * p + log(p + 1e-5) * p."""
    return -a * b + torch.log(b + 1e-5) * b


def scale_to_magnitude(a, b, c):
    """The code's power of ten for the push term, on Python floats."""
    a, b, c = (v + 1e-7 if v == 0 else v for v in (a, b, c))
    target = min(math.floor(math.log10(abs(a))), math.floor(math.log10(abs(b))))
    return 10 ** (target - math.floor(math.log10(abs(c))))


def build(student, adv, nat, **kw):
    recipe = PRESETS["ciard"].fn(copy.deepcopy(student), mt.Teacher(copy.deepcopy(adv)),
                                 mt.Teacher(copy.deepcopy(nat)), steps=STEPS, **kw)
    return recipe.train()


@pytest.fixture
def nets():
    return tiny_net(seed=0), tiny_net(seed=1), tiny_net(seed=2)


def official(student, adv, nat, x, y, temps):
    """The official step's losses on the given nets (float64 from the logits on), with their graphs."""
    x_adv = hand_pgd(student, x, lambda o: F.cross_entropy(o, y), "normal", steps=STEPS)
    student.train()
    adv.train()  # the robust teacher is trained: train mode, batch statistics
    nat.eval()
    s_adv, s_nat, a_adv = student(x_adv).double(), student(x).double(), adv(x_adv).double()
    with torch.no_grad():
        n_nat, n_adv = nat(x).double(), nat(x_adv).double()
    p_adv, p_nat = F.softmax(a_adv.detach() / temps[0], 1), F.softmax(n_nat / temps[1], 1)
    kl1 = kl_loss(F.log_softmax(s_adv, 1), p_adv).mean()
    kl2 = kl_loss(F.log_softmax(s_nat, 1), p_nat).mean()
    wrong = n_adv.argmax(1) != y
    kl3 = kl_loss(F.log_softmax(s_adv[wrong] / 5, 1), F.softmax(n_adv[wrong], 1)).mean()
    w3 = scale_to_magnitude(kl1.item(), kl2.item(), kl3.item())
    h = [(torch.log(p + 1e-5) * p).mean() for p in (p_adv, p_nat)]  # the code's (negative) entropies
    moved = [min(max(temps[k] - 0.001 * math.copysign(1, (h[k] / h[1 - k]).item() - 1), 1.0), 10.0)
             for k in range(2)]
    return dict(kl=(kl1, kl2, kl3), w3=w3, student=kl1 + kl2 - w3 * kl3, teacher_ce=F.cross_entropy(a_adv, y),
                wrong=wrong, temps=moved)


def test_the_student_loss_weights_gradient_and_temperatures_at_epoch_0(nets):
    recipe = build(*nets)
    recipe.balance.temperatures.copy_(torch.tensor([1.5, 2.5]))  # the teachers' temperatures, not the student's
    x, y = batch(BATCH)
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()
    student, adv, nat = (copy.deepcopy(n) for n in nets)
    torch.manual_seed(3)
    want = official(student, adv, nat, x, y, (1.5, 2.5))
    want["student"].backward()

    assert 0 < int(want["wrong"].sum()) < len(y)  # the push term masks some samples in, some out
    kl1, kl2, kl3 = (v.item() for v in want["kl"])
    assert out.losses.tolist() == pytest.approx([kl1, kl2, -kl3], rel=1e-5)
    assert out.weights.tolist() == pytest.approx([1.0, 1.0, want["w3"]])
    assert want["w3"] != 1.0  # the power of ten is exercised
    # the teacher's loss is 0 here; the push term cancels part of the sum: float32 leaves ~1e-8 absolute
    assert out.total.item() == pytest.approx(want["student"].item(), rel=1e-5, abs=1e-7)
    for g, w in zip(recipe.student.parameters(), student.parameters()):
        torch.testing.assert_close(g.grad, w.grad.float(), rtol=1e-4, atol=1e-7)
    teacher = recipe.teachers[0]
    assert teacher.trainable and all(p.grad is not None and not p.grad.any() for p in teacher.parameters())
    assert recipe.balance.temperatures.tolist() == pytest.approx(want["temps"])
    assert sorted(want["temps"]) != [1.5, 2.5]  # they moved


def test_from_epoch_50_the_robust_teacher_gets_exactly_the_gradient_of_its_own_ce(nets):
    recipe = build(*nets)
    for _ in range(49):
        recipe.on_epoch_end()
    x, y = batch(BATCH)
    torch.manual_seed(3)
    recipe(x, y).total.backward()
    assert not any(p.grad.any() for p in recipe.teachers[0].parameters())  # 49 epochs finished: still off
    recipe.teachers[0].zero_grad()
    recipe.student.zero_grad()
    recipe.on_epoch_end()  # 50 finished: the code's epoch 51 (1-based), its first teacher step

    student, adv, nat = (copy.deepcopy(n) for n in nets)
    torch.manual_seed(3)  # the recipe's first step moved the BN statistics: replay it on the hand copies
    official(student, adv, nat, x, y, (1.0, 1.0))
    temps = tuple(recipe.balance.temperatures.tolist())
    torch.manual_seed(4)
    out = recipe(x, y)
    out.total.backward()
    torch.manual_seed(4)
    want = official(student, adv, nat, x, y, temps)
    (want["student"] + want["teacher_ce"]).backward()
    assert out.total.item() == pytest.approx((want["student"] + want["teacher_ce"]).item(), rel=1e-5)
    for got, ref in ((recipe.teachers[0], adv), (recipe.student, student)):
        for g, w in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(g.grad, w.grad.float(), rtol=1e-4, atol=1e-7)


def test_the_temperatures_stop_at_epoch_214_and_the_clock_is_checkpointed(nets):
    recipe = build(*nets)
    for _ in range(214):
        recipe.on_epoch_end()
    before = recipe.balance.temperatures.clone()
    x, y = batch(BATCH)
    recipe(x, y)
    assert torch.equal(recipe.balance.temperatures, before)
    fresh = build(*nets)
    fresh.load_component_state(recipe.component_state())
    clock = fresh.teachers[0].loss.clock
    assert clock is fresh.balance.clock and int(clock.epoch) == 214


def test_official_settings():
    entry = PRESETS["ciard"]
    assert entry.teachers == ("adv", "nat") and entry.schedule == {"epochs": 300, "schedule": "cosine",
                                                                   "hold_fraction": 0.5, "milestones": ()}
    teachers = {r: {"model": "cifar_resnet8"} for r in entry.teachers}
    cfg = mt.ExperimentConfig(preset="ciard", teachers=teachers).train  # the code's LR: 0.1 to 150, cosine to 300
    code = [0.1 if e < 150 else 0.1 * (0.5 + math.cos(math.pi * (e - 150) / 150) / 2)
            * math.exp(-0.01 * ((e - 150) / 150) ** 2) for e in range(300)]
    ours = [cfg.lr * cfg.lr_factor(e) for e in range(300)]
    assert ours[:150] == [0.1] * 150 and ours[-1] < 1e-4
    assert max(abs(a - b) for a, b in zip(ours, code)) < 0.001  # the exp factor: at most 1% of the LR
    adv_net = tiny_net(seed=1)
    recipe = entry.fn(tiny_net(seed=0), mt.Teacher(adv_net), mt.Teacher(tiny_net(seed=2)))
    robust, clean = recipe.teachers
    assert robust.model is adv_net and robust.trainable and not clean.trainable
    assert robust.optimizer == {"name": "sgd", "lr": 1e-4, "momentum": 0.1, "weight_decay": 2e-4}
    assert robust.loss.start == 50
    pgd = recipe.branches[0].transform
    assert recipe.branches[2].transform is pgd and recipe.branches[2].teacher is clean
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.start, pgd.objective, pgd.bn_mode) == \
        (8 / 255, 2 / 255, 10, "normal", "ce", "eval")
    assert (recipe.balance.lr, recipe.balance.t_min, recipe.balance.t_max, recipe.balance.follow_lr) == \
        (0.001, 1.0, 10.0, False)
    assert recipe.branches[2].loss.student_temperature == 5.0


def test_the_magnitude_weighter_and_the_push_loss_edge_cases():
    w = MagnitudeMatch(3, scaled=[2])
    assert w.update(torch.tensor([0.034, 0.0051, -0.23])).tolist() == pytest.approx([1.0, 1.0, 0.01])
    assert w.update(torch.tensor([0.5, 0.02, 0.0])).tolist() == pytest.approx([1.0, 1.0, 1e5])  # 0 reads 1e-7
    assert make_weighter("magnitude", 3).scaled == [2]
    with pytest.raises(ValueError, match="unscaled"):
        MagnitudeMatch(2, scaled=[0, 1])
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    right = t.argmax(1)
    assert torch.equal(PushLoss()(s, t, right), torch.zeros(4))  # no error of the teacher: no push, no NaN


def test_a_schedule_of_the_users_is_never_mixed_with_the_presets():
    """The preset's schedule shape comes whole or not at all: a user's cosine with CIARD's hold would hold the LR
    for the whole run. A held cosine is a share of the epochs, so a budget that cuts them keeps its shape."""
    teachers = {r: {"model": "cifar_resnet8"} for r in PRESETS["ciard"].teachers}
    mine = mt.ExperimentConfig(preset="ciard", teachers=teachers, train={"epochs": 100, "milestones": [50, 75]}).train
    assert (mine.schedule, mine.hold_fraction, mine.milestones) == ("piecewise", 0.0, [50, 75])
    short = mt.ExperimentConfig(preset="ciard", teachers=teachers, train={"epochs": 4, "schedule": "cosine"}).train
    assert short.hold_fraction == 0 and short.lr_factor(3.5) < 0.1  # it anneals
    assert mt.ExperimentConfig(preset="natural", train={"epochs": 5}).train.select == "clean"  # one by one
    # a shape of the user's takes the preset's epochs, not TrainConfig's 300
    assert mt.ExperimentConfig(preset="nfgsm", train={"schedule": "cosine"}).train.epochs == 30
    assert mt.ExperimentConfig(preset="natural", train={"schedule": "cosine"}).train.epochs == 200
    # epochs alone keep the preset's shape: the milestones at the same shares (200 at 100, 150 -> 50 at 25, 38),
    # never TrainConfig's 215/260/285 past the end (a constant LR)
    assert mt.ExperimentConfig(preset="sat", train={"epochs": 50}).train.milestones == [25, 38]
    mtard = mt.ExperimentConfig(preset="mtard", teachers=teachers, train={"epochs": 100}).train
    assert mtard.milestones == [72, 87, 95]
    cyclic = mt.ExperimentConfig(preset="nfgsm", train={"epochs": 10}).train
    assert (cyclic.schedule, cyclic.cycle_momentum, cyclic.lr_factor(5)) == ("cyclic", 0.8, 1.0)
    held = mt.TrainConfig(epochs=10, schedule="cosine", hold_fraction=0.5, milestones=[])
    assert [held.lr_factor(e) for e in (0, 4.9)] == [1.0, 1.0] and held.lr_factor(7.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="hold_fraction holds a cosine schedule"):
        mt.TrainConfig(schedule="piecewise", hold_fraction=0.5)
