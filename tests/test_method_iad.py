"""IAD-I (ZFancy/IAD): its loss, per-sample trust and warm-up, re-done by hand on copies of the same nets."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.iad import Introspection
from multiteach.presets import PRESETS
from multiteach.registry import WEIGHTERS
from tests.conftest import tiny_net

EPS, ALPHA = 8 / 255, 2 / 255


def batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def kl_rows(s, t, T=1.0):
    """Per-sample KL(softmax(t/T) || softmax(s/T)), summed over classes, float64 (nn.KLDivLoss(reduce=False)
    on (log_softmax(s), softmax(t)), then .sum(dim=1), as the IAD code writes it)."""
    p = F.softmax(t.double() / T, 1)
    return (p * (torch.log(p) - F.log_softmax(s.double() / T, 1))).sum(1)


def hand_ce_pgd_train_mode(model, x, y, steps=10):
    """IAD-I's AttackPGD: uniform start, CE summed, sign steps of 2/255, the student in train mode."""
    model.train()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)  # x in [0.1, 0.9]: the clamp is idle
    for _ in range(steps):
        x_adv.requires_grad_()
        grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + ALPHA * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    return x_adv.detach()


def setup(**kw):
    student, teacher = tiny_net(seed=0), tiny_net(seed=1).eval()
    recipe = PRESETS["iad"].fn(copy.deepcopy(student), mt.Teacher(copy.deepcopy(teacher)), **kw)
    return recipe, student, teacher


def hand_iad(s, t, x, y, epoch, begin=60, beta=0.1):
    """The IAD-I training step's loss and its parts (alpha = 1, tau = 1)."""
    torch.manual_seed(3)
    x_adv = hand_ce_pgd_train_mode(s, x, y)
    s_adv, s_nat = s(x_adv), s(x)
    with torch.no_grad():
        t_nat, t_adv = t(x), t(x_adv)
    trust = F.softmax(t_adv.double(), 1).gather(1, y.view(-1, 1)).squeeze(1) ** beta  # a_i = p_T(y|x')^beta
    kd = kl_rows(s_adv, t_nat)  # the teacher's CLEAN output is the target (ARD's), tau^2 = 1
    intro = kl_rows(s_adv, s_nat)  # KL(S(x) || S(x')), S(x) not detached
    ce = F.cross_entropy(s_nat.double(), y, reduction="none")
    w_intro = 1.0 - trust if epoch >= begin else torch.zeros_like(trust)
    total = kd.mean() + (w_intro * intro).mean() + 0.0 * ce.mean()
    return total, torch.stack([kd.mean(), intro.mean(), ce.mean(), trust.mean()]), w_intro


@pytest.mark.parametrize("epoch", [59, 60])
def test_iad_loss_trust_and_warm_up_against_the_formula(epoch):
    """Before epoch 60 (0-based) the loss is ARD's KL(T(x) || S(x')) at tau = 1 alone; from 60 on it adds
    mean_i (1 - a_i) KL(S(x)_i || S(x')_i) with a_i = p_T(y_i | x'_i)^0.1 from the teacher's output on x'."""
    recipe, s, t = setup()
    recipe.epoch = epoch
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    want, parts, w_intro = hand_iad(s, t, x, y, epoch)
    assert recipe.branch_names == ["adv_kd", "introspection", "clean_ce", "trust"]
    torch.testing.assert_close(out.losses, parts.float(), rtol=1e-5, atol=1e-7)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.weights.tolist() == pytest.approx([1.0, w_intro.mean().item(), 0.0, 0.0], rel=1e-5)
    if epoch >= 60:
        assert 0 < w_intro.mean().item() < 1 and w_intro.std().item() > 0  # per-sample, not one batch weight
        # the gradient reaches the student through both S(x') and the undetached S(x), a_i held constant
        out.total.backward()
        want.backward()
        for p, q in zip(recipe.student.parameters(), s.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_iad_options_scale_the_terms():
    """temperature tau: tau^2 KL at tau; alpha_kd < 1: alpha on both KL terms, (1 - alpha) CE; beta and begin
    move the trust and the warm-up."""
    recipe, s, t = setup(temperature=4.0, alpha_kd=0.75, beta=0.5, begin=2)
    recipe.epoch = 2
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    torch.manual_seed(3)
    x_adv = hand_ce_pgd_train_mode(s, x, y)
    s_adv, s_nat = s(x_adv), s(x)
    with torch.no_grad():
        t_nat, t_adv = t(x), t(x_adv)
    trust = F.softmax(t_adv.double(), 1).gather(1, y.view(-1, 1)).squeeze(1) ** 0.5
    want = (0.75 * 16.0 * kl_rows(s_adv, t_nat, T=4.0).mean() + 0.75 * ((1 - trust) * kl_rows(s_adv, s_nat)).mean()
            + 0.25 * F.cross_entropy(s_nat.double(), y))
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.weights[[0, 2, 3]].tolist() == pytest.approx([0.75, 0.25, 0.0])


def test_introspection_weighter_by_name_and_its_checks():
    w = WEIGHTERS.build({"name": "iad", "weights": [1.0, 1.0], "introspection": 1, "trust_from": 0, "begin": 0},
                        n=2)
    assert isinstance(w, Introspection)
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    ctx = mt.StepContext(torch.ones(2, 2), y, [None, None], [logits, None], epoch=0)
    p = torch.softmax(logits, 1)[:, 0]
    torch.testing.assert_close(w.weigh(ctx), torch.stack([torch.ones(2), 1 - p ** 0.1]))
    with pytest.raises(ValueError, match="not a branch index"):
        Introspection(2, [1.0, 1.0], introspection=2, trust_from=0)
    with pytest.raises(ValueError, match="2 weights for 3 branches"):
        Introspection(3, [1.0, 1.0], introspection=1, trust_from=0)


def test_iad_schedule_is_the_one_its_code_runs():
    """--lr_schedule 100 150, but adjust_learning_rate multiplies the initial LR at each: 0.01 from 100 on."""
    assert PRESETS["iad"].schedule == {"epochs": 200, "milestones": (100,)}
    assert PRESETS["iad"].teachers == ("adv",)
