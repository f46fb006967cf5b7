"""DGAD: the split by the teacher's clean mistakes, the label-swapped teacher logits and the consistency MSE,
re-done by hand as the official main.py writes them (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.dgad import TeacherMistakeSplit, dgad, swap_true_and_top
from multiteach.weighting import StepContext, make_weighter
from tests.conftest import Sharp, tiny_net

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3  # 3 PGD steps, 16x16 images: each step is the code's, the test stays fast


def batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(8, 3, 16, 16, generator=g)


def kl_rows(s, t):
    """KL(softmax(t) || softmax(s)) per sample, summed over classes, float64."""
    p = F.softmax(t.double(), 1)
    return (p * (torch.log(p) - F.log_softmax(s.double(), 1))).sum(1)


def code_swap_clean(t, y):
    """main.py's swap on T(x): where argmax != y, exchange the true logit and the max."""
    t2 = t.clone()
    mis = t.argmax(1) != y
    true = torch.gather(t, 1, y.unsqueeze(1)).squeeze()
    mx, idx = torch.max(t, dim=1)
    t2[mis, y[mis]] = mx[mis]
    t2[mis, idx[mis]] = true[mis]
    return t2


def code_swap_adv(t, y):
    """main.py's swap on T(x'): where z_y < max_{j != y} z_j, exchange them."""
    t2 = t.clone()
    correct = torch.gather(t, 1, y.unsqueeze(1)).squeeze()
    mx, idx = torch.max(t.scatter(1, y.unsqueeze(1), -float("inf")), dim=1)
    mask = correct - mx < 0
    t2[mask, y[mask]] = mx[mask]
    t2[mask, idx[mask]] = correct[mask]
    return t2


def test_label_swap_is_both_rules_of_the_code():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    y[:16] = t[:16].argmax(1)  # rows the teacher gets right: unchanged
    t[16, 3], t[16, 7], y[16] = 9.0, 9.0, 7  # a tie between the true class and another: unchanged
    t[16, [0, 1, 2, 4, 5, 6, 8, 9]] = 0.0
    want = code_swap_adv(t, y)
    torch.testing.assert_close(swap_true_and_top(t, y), want, rtol=0, atol=0)
    torch.testing.assert_close(code_swap_clean(t, y), want, rtol=0, atol=0)
    torch.testing.assert_close(swap_true_and_top(t, y)[:16], t[:16], rtol=0, atol=0)
    fixed = swap_true_and_top(t, y)
    assert (fixed.gather(1, y.view(-1, 1)).squeeze(1) >= fixed.max(1).values).all()  # every row now right
    assert torch.equal(fixed.sort(1).values, t.sort(1).values)  # a permutation of each row


def setup(pcr_weight=1.0):
    s, t = tiny_net(seed=1), Sharp(tiny_net(seed=2), 8.0).eval()
    x = batch()
    with torch.no_grad():
        pred = t(x).argmax(1)
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 10  # the teacher misclassifies the even samples' clean images, not the odd ones
    recipe = dgad(copy.deepcopy(s), mt.Teacher(copy.deepcopy(t)), steps=STEPS, pcr_weight=pcr_weight)
    return recipe, s, t, x, y


def hand_dgad(s, t, x, y, pcr_weight=1.0):
    """main.py --method DGAD, written out: AdaAD's inner attack, then the split, swaps and MSE (float64)."""
    torch.manual_seed(3)
    s.eval()
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        loss = F.kl_div(F.log_softmax(s(x_adv), 1), F.softmax(t(x_adv), 1), reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    s.train()
    s_ori, s_adv = s(x).double(), s(x_adv).double()
    with torch.no_grad():
        t_ori, t_adv = t(x).double(), t(x_adv).double()
    lam = (t_ori.argmax(1) != y).double()
    n, bs = lam.sum(), len(y)
    kl_clean, kl_adv = kl_rows(s_ori, code_swap_clean(t_ori, y)), kl_rows(s_adv, code_swap_adv(t_adv, y))
    loss_clean = (1 / (n + 1e-10)) * (lam * kl_clean).sum()
    loss_adv = (1 / (bs - n)) * ((1 - lam) * kl_adv).sum()
    mse = (F.softmax(s_adv, 1) - F.softmax(s_ori, 1)).pow(2)
    total = (n / bs) * loss_clean + ((bs - n) / bs) * loss_adv + pcr_weight * mse.mean()
    return total, torch.stack([kl_clean.mean(), kl_adv.mean(), mse.mean(1).mean()]), lam


def test_dgad_total_branches_split_and_gradient_by_hand():
    """Loss, per-branch means and weights as main.py; the gradient too: the MSE pulls S(x) and S(x') together
    (neither detached), the corrected teacher logits are constants."""
    recipe, s, t, x, y = setup(pcr_weight=0.5)
    torch.manual_seed(3)
    out = recipe(x, y)
    out.total.backward()
    want, losses, lam = hand_dgad(s, t, x, y, pcr_weight=0.5)
    want.backward()
    assert lam[::2].tolist() == [1.0] * 4 and lam[1::2].tolist() == [0.0] * 4
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, losses.float(), rtol=1e-5, atol=1e-8)
    assert out.weights.tolist() == pytest.approx([0.5, 0.5, 0.5])
    for (name, p), q in zip(s.named_parameters(), recipe.student.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in recipe.teachers[0].parameters())


def test_split_weighter_per_sample_and_when_one_group_is_empty():
    w = TeacherMistakeSplit(3, clean=0, adv=1, weights=[1.0, 1.0, 0.5])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 5.0]])
    y = torch.tensor([0, 0, 2])
    got = w.weigh(StepContext(torch.zeros(3, 3), y, [], [t, None, None]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5]]))
    wrong = w.weigh(StepContext(torch.zeros(3, 3), torch.tensor([1, 0, 0]), [], [t, None, None]))
    assert wrong[1].tolist() == [0.0, 0.0, 0.0] and torch.isfinite(wrong).all()
    other = make_weighter({"name": "dgad", "clean": 1, "adv": 0}, 2)  # e.g. MTARD's (adv, nat) branches
    assert other.weigh(StepContext(torch.zeros(2, 3), y, [], [None, t])).tolist() == [[1, 0, 1], [0, 1, 0]]
