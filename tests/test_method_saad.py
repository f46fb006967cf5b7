"""SAAD: the per-sample entropy weights, the linearised-teacher attack and the weighted KL + IGDM loss, re-done by
hand as the official saad.py writes them (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.saad import SampleEntropyWeighting, saad
from multiteach.weighting import StepContext, make_weighter
from tests.conftest import Sharp, tiny_net

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3  # 3 PGD steps, 16x16 images: each step is the code's, the test stays fast


def kl_rows(s, t):
    """KL(softmax(t) || softmax(s)) per sample, summed over classes, float64."""
    p = F.softmax(t.double(), 1)
    return (p * (torch.log(p) - F.log_softmax(s.double(), 1))).sum(1)


def hand_weights(logits, order=1.0):
    """saad.py: w = 5 (H - min H), clamped at 0, and its min-max normalisation (float64)."""
    p = F.softmax(logits.double(), 1)
    if order == 1.0:
        h = -(p * torch.log(p + 1e-12)).sum(1)
    else:
        h = torch.log((p ** order).sum(1) + 1e-12) / (1 - order)
    w = torch.clamp(5 * (h - h.min()), min=0.0)
    return w, (w - w.min()) / (w.max() - w.min() + 1e-8)


@pytest.mark.parametrize("order", [1.0, 2.0])
def test_entropy_weights_by_hand(order):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g) * torch.tensor([0.1, 1.0, 2.0, 4.0, 8.0, 0.5]).view(-1, 1)
    y = torch.randint(0, 10, (6,), generator=g)
    weighter = SampleEntropyWeighting(3, source=1, order=order, weights=[1.0, 2.0, 3.0], clean=(2,), beta=0.5)
    got = weighter.weigh(StepContext(torch.zeros(3, 6), y, [], [None, logits, None]))
    w, w_norm = hand_weights(logits, order)
    want = torch.stack([w, 2 * w, 0.5 * 3 * (1 - w_norm)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[0].min() == 0.0 and got[0].argmin() == 4  # the most confident sample (x8 logits) gets weight 0
    assert got[0].argmax() == 0 and got[2, 0] == 0.0  # the flattest gets the most, and nothing on its clean term
    built = make_weighter({"name": "saad", "source": 1, "order": order, "weights": [1, 2, 3], "clean": [2],
                           "beta": 0.5}, 3)
    torch.testing.assert_close(built.weigh(StepContext(torch.zeros(3, 6), y, [], [None, logits, None])), got)


def hand_attack(s, t, x, y, lam=1.0):
    """attacks.saad_inner_loss: PGD on KL(softmax(z) || softmax(S(x'))), z = T(x) with
    z_y += lam <grad_x T_y(x), x' - x>, the gradient also through z."""
    x_temp = x.detach().clone().requires_grad_(True)
    t_logits = t(x_temp)
    g = torch.autograd.grad(t_logits[torch.arange(len(y)), y].sum(), x_temp)[0]
    s.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        correction = torch.einsum("bchw,bchw->b", g, x_adv - x)
        z = t_logits.detach().clone()
        z[torch.arange(len(y)), y] += lam * correction
        loss = F.kl_div(F.log_softmax(s(x_adv), 1), F.softmax(z, 1), reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    s.train()
    return x_adv


@pytest.mark.parametrize(("beta", "epoch", "lam"), [(0.0, 0, 1.0), (0.5, 149, 0.5)])
def test_saad_loss_by_hand(beta, epoch, lam):
    """saad.py's step: w (KL(T(x')||S(x')) + igdm_alpha (e/E) KL(T(x')-T(x-d) || S(x')-S(x-d)))
    + beta (1 - w~) KL(T(x)||S(x)), batch mean; e counts epochs from 1 (recipe.epoch finished ones)."""
    s, t = tiny_net(seed=1), Sharp(tiny_net(seed=2), 6.0).eval()
    g = torch.Generator().manual_seed(5)
    x, y = 0.1 + 0.8 * torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    recipe = saad(copy.deepcopy(s), mt.Teacher(copy.deepcopy(t)), steps=STEPS, beta=beta, lambda_inner=lam)
    recipe.epoch = epoch
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()

    torch.manual_seed(3)
    x_adv = hand_attack(s, t, x, y, lam)
    delta = x_adv - x
    with torch.no_grad():
        t_clean, t_plus, t_minus = t(x).double(), t(x_adv).double(), t(x - delta).double()
    s_plus, s_minus, s_clean = s(x_adv).double(), s(x - delta).double(), s(x).double()
    w, w_norm = hand_weights(t_plus)
    kl_adv, kl_clean = kl_rows(s_plus, t_plus), kl_rows(s_clean, t_clean)
    ramp = 1.0 * (epoch + 1) / 200  # igdm_alpha = 1 on CIFAR-10, epoch/args.epochs with epoch from 1
    igdm = kl_rows(s_plus - s_minus, t_plus - t_minus)
    want = (w * (kl_adv + ramp * igdm) + beta * (1 - w_norm) * kl_clean).mean()
    want.backward()

    # the weights subtract entropies of ~2 in float32, as the code (~1e-6 absolute): hence 1e-4 on them and
    # the total; the IGDM term differences logits in float32 (~1e-8 absolute on its ~3e-4)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(out.losses, torch.stack([kl_adv, igdm, kl_clean]).mean(1).float(), rtol=1e-5,
                               atol=1e-7)
    weights = torch.stack([w, ramp * w, beta * (1 - w_norm)]).mean(1)
    torch.testing.assert_close(out.weights, weights.float(), rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(s.named_parameters(), recipe.student.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_saad_igdm_weight_follows_the_epoch():
    """The IGDM row is w_i * alpha (e + 1) / E; the KL rows do not move with the epoch."""
    recipe = saad(tiny_net(seed=1), mt.Teacher(tiny_net(seed=2)), num_classes=10, epochs=100)
    g = torch.Generator().manual_seed(0)
    t_adv = torch.randn(4, 10, generator=g) * 3
    w, _ = hand_weights(t_adv)
    for epoch in (0, 9, 49, 99, 120):
        ctx = StepContext(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long), [], [t_adv, None, t_adv], epoch)
        got = recipe.weighter.weigh(ctx).double()
        torch.testing.assert_close(got[1], w * (epoch + 1) / 100, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[0], w, rtol=1e-5, atol=1e-7)
        assert got[2].abs().max() == 0.0  # beta = 0: the clean term is off
    cifar100 = saad(tiny_net(num_classes=100), mt.Teacher(tiny_net(num_classes=100)), num_classes=100)
    assert cifar100.weighter.alpha == 10.0 and recipe.weighter.alpha == 1.0
