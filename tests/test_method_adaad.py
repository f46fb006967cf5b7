"""AdaAD and AdaIAD (boyellow/AdaAD): the attack through the teacher and the losses, re-done by hand on copies
of the same nets and batch, with the same random draws."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.presets import PRESETS
from tests.conftest import tiny_net

EPS, ALPHA = 8 / 255, 2 / 255


def batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def kl_rows(s, t, T=1.0):
    """Per-sample KL(softmax(t/T) || softmax(s/T)) summed over classes, float64: F.kl_div(log_softmax(s),
    softmax(t)) before its reduction, as the AdaAD code calls it."""
    p = F.softmax(t.double() / T, 1)
    return (p * (torch.log(p) - F.log_softmax(s.double() / T, 1))).sum(1)


def hand_adaad_attack(s, t, x, steps=10, eps=EPS, alpha=ALPHA):
    """adaad_inner_loss: x + 0.001 N(0, 1), then sign ascent of sum KLDivLoss(log_softmax(S(x')), softmax(T(x')))
    with both networks on the current x' (the gradient through both), the student in eval mode."""
    s.eval()
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.kl_div(F.log_softmax(s(x_adv), 1), F.softmax(t(x_adv), 1), reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    s.train()
    return x_adv.detach()


def setup(preset, num_classes=10, **kw):
    student, teacher = tiny_net(num_classes, seed=0), tiny_net(num_classes, seed=1).eval()
    recipe = PRESETS[preset].fn(copy.deepcopy(student), mt.Teacher(copy.deepcopy(teacher)), num_classes=num_classes,
                                **kw)
    return recipe, student, teacher


def test_adaad_is_the_kl_on_examples_crafted_through_the_teacher():
    """CIFAR-10: KL(T(x') || S(x')) averaged over batch x classes, weight 1; the clean term has weight 0 but
    runs first, so the BN running statistics see S(x) then S(x') as in the code."""
    recipe, s, t = setup("adaad")
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    torch.manual_seed(3)
    x_adv = hand_adaad_attack(s, t, x)
    s_nat, s_adv = s(x), s(x_adv)  # the code's order: ori_outputs, then adv_outputs
    with torch.no_grad():
        t_nat, t_adv = t(x), t(x_adv)
    nat, adv = kl_rows(s_nat, t_nat).mean() / 10, kl_rows(s_adv, t_adv).mean() / 10  # nn.KLDivLoss(): / (B C)
    assert recipe.branch_names == ["nat_kl", "adv_kl"]
    torch.testing.assert_close(out.losses, torch.stack([nat, adv]).float(), rtol=1e-5, atol=1e-9)
    assert out.total.item() == pytest.approx(adv.item(), rel=1e-5)
    assert out.weights.tolist() == [0.0, 1.0]
    for b_recipe, b_hand in zip(recipe.student.buffers(), s.buffers()):
        torch.testing.assert_close(b_recipe, b_hand)
    out.total.backward()
    adv.backward()
    for p, q in zip(recipe.student.parameters(), s.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8)


def test_adaad_attack_differs_from_a_fixed_clean_reference_and_from_the_student_first_direction():
    """The attack's reference is T(x') at every step, in the KL(T || S) order of the code: a fixed T(x)
    reference (RSLAD's) or the reversed divergence craft other examples."""
    recipe, s, t = setup("adaad", steps=3)
    x, y = batch()
    torch.manual_seed(3)
    x_adv = recipe.branches[1].transform(recipe.student, x, y)
    torch.manual_seed(3)
    assert torch.equal(x_adv, hand_adaad_attack(s, t, x, steps=3))
    with torch.no_grad():
        t_nat = t(x)
    torch.manual_seed(3)
    fixed = mt.PGD(steps=3, start="normal", objective="kl")(s, x, y, t_nat)
    s.eval()
    torch.manual_seed(3)
    z = x + 0.001 * torch.randn(x.shape)
    for _ in range(3):  # KL(S(x') || T(x')): the arguments the other way round
        z.requires_grad_()
        g = torch.autograd.grad(F.kl_div(F.log_softmax(t(z), 1), F.softmax(s(z), 1), reduction="sum"), [z])[0]
        z = torch.min(torch.max(z.detach() + ALPHA * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    assert not torch.equal(x_adv, fixed) and not torch.equal(x_adv, z.detach())


def test_adaad_cifar100_is_batchmean_and_alpha_mixes_the_clean_term():
    """CIFAR-100: the code's (1/B) sum KLDivLoss(reduce=False), the per-sample sum; alpha = 0.5 weighs the
    clean term KL(T(x) || S(x)) by 1 - alpha."""
    recipe, s, t = setup("adaad", num_classes=100, alpha_kd=0.5, steps=4)
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    torch.manual_seed(3)
    x_adv = hand_adaad_attack(s, t, x, steps=4)
    with torch.no_grad():
        nat, adv = kl_rows(s(x), t(x)).mean(), kl_rows(s(x_adv), t(x_adv)).mean()
    torch.testing.assert_close(out.losses, torch.stack([nat, adv]).float(), rtol=1e-5, atol=1e-9)
    assert out.total.item() == pytest.approx((0.5 * adv + 0.5 * nat).item(), rel=1e-5)
    with pytest.raises(ValueError, match="alpha_kd"):
        PRESETS["adaad"].fn(tiny_net(), mt.Teacher(tiny_net()), alpha_kd=0.5, weighter="dwa")


@pytest.mark.parametrize("epoch", [59, 60])
def test_adaiad_is_iads_loss_on_adaads_examples(epoch):
    """900 KL(T(x')/30 || S(x')/30) batchmean, plus mean_i (1 - a_i) KL(S(x)_i || S(x')_i) from epoch 60 on,
    a_i = p_T(y_i | x'_i)^0.1 (T = 1); CE with weight 1 - alpha = 0."""
    recipe, s, t = setup("adaiad", steps=4)
    recipe.epoch = epoch
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)
    torch.manual_seed(3)
    x_adv = hand_adaad_attack(s, t, x, steps=4)
    s_nat, s_adv = s(x), s(x_adv)
    with torch.no_grad():
        t_adv = t(x_adv)
    trust = F.softmax(t_adv.double(), 1).gather(1, y.view(-1, 1)).squeeze(1) ** 0.1
    kd = 900.0 * kl_rows(s_adv, t_adv, T=30.0).mean()
    intro = kl_rows(s_adv, s_nat)
    w_intro = 1.0 - trust if epoch >= 60 else torch.zeros_like(trust)
    ce = F.cross_entropy(s_nat.double(), y)
    assert recipe.branch_names == ["clean_ce", "adv_kd", "introspection"]
    # float32 at T = 30 (as the official script computes it) cancels to ~1e-4 relative error
    torch.testing.assert_close(out.losses, torch.stack([ce, kd, intro.mean()]).float(), rtol=5e-4, atol=1e-7)
    want = kd + (w_intro * intro).mean()
    assert out.total.item() == pytest.approx(want.item(), rel=5e-4)
    assert out.weights.tolist() == pytest.approx([0.0, 1.0, w_intro.mean().item()], rel=1e-5)
    if epoch >= 60:
        assert w_intro.std().item() > 0


def test_official_schedules_and_attack_settings():
    """The README's commands: eps 8/255, step 2/255, 10 steps; T = 30, beta = 0.1, from epoch 60 (AdaIAD)."""
    for name in ("adaad", "adaiad"):
        assert PRESETS[name].schedule == {"epochs": 200, "milestones": (100, 150)}
        assert PRESETS[name].teachers == ("adv",)
        opts = PRESETS[name].options()
        assert (opts["eps"], opts["alpha"], opts["steps"], opts["alpha_kd"]) == (8 / 255, 2 / 255, 10, 1.0)
    assert {k: PRESETS["adaiad"].options()[k] for k in ("temperature", "beta", "begin")} == \
        {"temperature": 30.0, "beta": 0.1, "begin": 60}
