"""IGDM: the gradient-matching term KL(T(x+d) - T(x-d) || S(x+d) - S(x-d)), d = x' - x, its ramp over the epochs,
as the add-on to AdaAD (the registered preset) and to any recipe (with_igdm), re-done by hand as the official
adaad_IGDM / rslad_IGDM scripts write it (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.losses import KLDistill
from multiteach.methods.igdm import EpochRamp, Recorded, igdm, igdm_branch, with_igdm
from multiteach.methods.rslad import rslad
from multiteach.recipe import Branch, Recipe
from multiteach.transforms import PGD
from multiteach.weighting import ANL, Fixed, StepContext, UncertaintyWeighting
from tests.conftest import tiny_net

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3  # 3 PGD steps, 16x16 images: each step is the code's, the test stays fast


def batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def kl_rows(s, t):
    """KL(softmax(t) || softmax(s)) per sample, summed over classes, float64."""
    p = F.softmax(t.double(), 1)
    return (p * (torch.log(p) - F.log_softmax(s.double(), 1))).sum(1)


def hand_pgd(s, x, objective, clamp_start=False):
    """The distillation codes' PGD: x + 0.001 N(0, 1), student in eval mode, sign steps, projection, clamp
    (``clamp_start``: the start clamped to [0, 1] too, as the library's PGD, for batches with 0 and 1 pixels)."""
    s.eval()
    x_adv = x + 0.001 * torch.randn(x.shape)
    x_adv = x_adv.clamp(0, 1) if clamp_start else x_adv
    for _ in range(STEPS):
        x_adv.requires_grad_()
        grad = torch.autograd.grad(objective(x_adv), [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + ALPHA * torch.sign(grad), x - EPS), x + EPS).clamp(0, 1)
    s.train()
    return x_adv


def igdm_term(s, t, x, x_adv, beta, gamma):
    """The official IGDM loss: batchmean KL(softmax(T(x+bd) - T(x-gd)) || softmax(S(x+bd) - S(x-gd)))."""
    delta = x_adv - x
    with torch.no_grad():
        t_plus, t_minus = t(x + beta * delta), t(x - gamma * delta)
    return kl_rows(s(x + beta * delta) - s(x - gamma * delta), t_plus - t_minus)


@pytest.mark.parametrize(("beta", "gamma", "epoch"), [(1.0, 1.0, 0), (1.5, 0.5, 119)])
def test_adaad_igdm_preset_by_hand(beta, gamma, epoch):
    """adaad_IGDM: KL(T(x')||S(x')) + 0 KL(T(x)||S(x)) + alpha (e/200) IGDM, e from 1, x' AdaAD's attack."""
    s, t = tiny_net(seed=1), tiny_net(seed=2).eval()
    x, y = batch()
    recipe = igdm(copy.deepcopy(s), mt.Teacher(copy.deepcopy(t)), steps=STEPS, beta=beta, gamma=gamma)
    recipe.epoch = epoch
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()

    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, lambda xa: F.kl_div(F.log_softmax(s(xa), 1), F.softmax(t(xa), 1), reduction="sum"))
    with torch.no_grad():
        t_adv, t_nat = t(x_adv), t(x)
    kl_adv, kl_nat = kl_rows(s(x_adv), t_adv), kl_rows(s(x), t_nat)
    term = igdm_term(s, t, x, x_adv, beta, gamma)
    ramp = 20.0 * (epoch + 1) / 200
    want = kl_adv.mean() + 0.0 * kl_nat.mean() + ramp * term.mean()
    want.backward()

    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.stack([kl_adv, kl_nat, term]).mean(1).float(), rtol=1e-5, atol=1e-7)
    assert out.weights.tolist() == pytest.approx([1.0, 0.0, ramp])
    # the IGDM gradient reaches the student through both S(x + bd) and S(x - gd), never the teacher
    for (name, p), q in zip(s.named_parameters(), recipe.student.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in recipe.teachers[0].parameters())


def test_igdm_term_alone_has_the_gradient_of_both_student_forwards():
    """A recipe of the IGDM branch alone: its gradient is that of the hand formula (a detached S(x - d) or a
    teacher difference with a gradient would change it); x - gamma d is not clamped to [0, 1] (the batch has
    black and white pixels, where it leaves the box)."""
    s, t = tiny_net(seed=1), tiny_net(seed=2).eval()
    x, y = batch()
    x[:, :, 0], x[:, :, -1] = 0.0, 1.0
    student, teacher = copy.deepcopy(s), mt.Teacher(copy.deepcopy(t))
    source = Recorded(PGD(eps=EPS, alpha=ALPHA, steps=STEPS, start="normal", objective="ce"))
    branches = [Branch(source, KLDistill(1.0, "batchmean"), teacher=teacher), igdm_branch(teacher, source, gamma=2.0)]
    recipe = Recipe(student, branches, Fixed([0.0, 1.0]))
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()
    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, lambda xa: F.cross_entropy(s(xa), y, reduction="sum"), clamp_start=True)
    assert ((x - 2.0 * (x_adv - x)) < 0).any() and ((x - 2.0 * (x_adv - x)) > 1).any()
    s(x_adv)  # the adversarial branch's forward (weight 0): the BN running statistics as the recipe's
    want = igdm_term(s, t, x, x_adv, 1.0, 2.0).mean()
    want.backward()
    assert out.total.item() == pytest.approx(want.item(), rel=1e-4)  # a KL of ~6e-3 in float32: ~1e-5 off
    for (name, p), q in zip(s.named_parameters(), recipe.student.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-8, msg=name)


def test_with_igdm_on_rslad_takes_d_from_its_attack():
    """rslad_IGDM: 5/6 KL(T(x)||S(x')) + 1/6 KL(T(x)||S(x)) (mean over batch x classes) + alpha (e/E) IGDM,
    d from RSLAD's attack (KL to the teacher's clean output); RSLAD's recipe itself is left as it was."""
    s, t = tiny_net(seed=1), tiny_net(seed=2).eval()
    x, y = batch()
    base = rslad(copy.deepcopy(s), mt.Teacher(copy.deepcopy(t)), steps=STEPS)
    recipe = with_igdm(base, alpha=5.0, epochs=50)
    assert recipe.branch_names == ["adv_kl", "nat_kl", "igdm"] and recipe.name == "rslad+igdm"
    assert isinstance(recipe.branches[0].transform, Recorded) and isinstance(base.branches[0].transform, PGD)
    assert recipe.branches[0].transform.reference is base.teachers[0]  # the attack's reference went through
    recipe.epoch = 9
    torch.manual_seed(3)
    out = recipe(x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        t_nat = t(x)
    x_adv = hand_pgd(s, x, lambda xa: F.kl_div(F.log_softmax(s(xa), 1), F.softmax(t_nat, 1), reduction="sum"))
    kl_adv, kl_nat = kl_rows(s(x_adv), t_nat) / 10, kl_rows(s(x), t_nat) / 10  # mean over batch x classes
    term = igdm_term(s, t, x, x_adv, 1.0, 1.0)
    ramp = 5.0 * 10 / 50
    want = 5 / 6 * kl_adv.mean() + 1 / 6 * kl_nat.mean() + ramp * term.mean()
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.stack([kl_adv, kl_nat, term]).mean(1).float(), rtol=1e-5, atol=1e-7)
    assert out.weights.tolist() == pytest.approx([5 / 6, 1 / 6, ramp])


def test_ramp_across_epochs_around_any_weighter():
    """alpha (e + 1) / E on the IGDM row for every epoch, the base weighter's own weights (and state) elsewhere."""
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.5, 0.5]])
    appended = EpochRamp(ANL(2, w0=[0.3, 0.7]), 3, 2, alpha=20.0, epochs=200)
    inserted = EpochRamp(Fixed([1.0, 2.0]), 3, 0, alpha=1.0, epochs=10)
    scaled = EpochRamp(Fixed([1.0, 4.0, 1.0]), 3, 1, alpha=2.0, epochs=4)
    for epoch in (0, 1, 99, 199, 250):
        ctx = StepContext(losses, torch.zeros(2, dtype=torch.long), [], [], epoch)
        w = appended.weigh(ctx)
        assert w[2].item() == pytest.approx(20.0 * (epoch + 1) / 200)
        assert inserted.weigh(ctx).tolist() == pytest.approx([(epoch + 1) / 10, 1.0, 2.0])
        assert scaled.weigh(ctx).tolist() == pytest.approx([1.0, 8.0 * (epoch + 1) / 4, 1.0])
    assert appended.inner.initial.tolist() == [2.0, 2.0]  # ANL saw the two base losses only
    assert "inner.weights" in appended.state_dict()
    with pytest.raises(ValueError, match="not a weighted sum"):
        EpochRamp(UncertaintyWeighting(2), 3, 2, alpha=1.0, epochs=10)


def test_igdm_branch_before_its_attack_is_refused():
    teacher = mt.Teacher(tiny_net(seed=2))
    source = Recorded(PGD(eps=EPS, alpha=ALPHA, steps=1, start="normal"))
    branches = [igdm_branch(teacher, source), Branch(source, KLDistill(), teacher=teacher)]
    recipe = Recipe(tiny_net(seed=1), branches)
    x, y = batch()
    with pytest.raises(RuntimeError, match="must come before the IGDM branch"):
        recipe(x, y)
