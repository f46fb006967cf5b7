import math

import pytest
import torch

from multiteach import ANL, DWA, Fixed, RandomLossWeighting, UncertaintyWeighting
from multiteach.registry import WEIGHTERS
from multiteach.weighting import StepContext, Weighter, make_weighter


def ctx_of(losses: torch.Tensor) -> StepContext:
    """A step context for (N, B) per-sample losses (labels unused by these weighters)."""
    return StepContext(losses.detach(), torch.zeros(losses.shape[1], dtype=torch.long))


def test_anl_two_branches_hand_worked():
    # beta = 1, r_w = 0.025, w0 = (1/2, 1/2). Step 0 fixes L(0) = (2, 1), so r = (1/2, 1/2) and w stays.
    # Step 1: L/L0 = (0.5, 0.8) -> r = (0.5/1.3, 0.8/1.3); w = 0.025 r + 0.975 w.
    # Step 2: L/L0 = (0.25, 0.6) -> r = (0.25/0.85, 0.6/0.85).
    anl = ANL(2, beta=1.0, rw=0.025)
    expected = [(0.5, 0.5), (0.497115385, 0.502884615), (0.492040441, 0.507959559)]
    for losses, want in zip([(2.0, 1.0), (1.0, 0.8), (0.5, 0.6)], expected):
        w = anl.update(losses)
        assert w.tolist() == pytest.approx(want, abs=1e-6)  # float32 weights


def test_anl_three_branches_hand_worked():
    # r_w = 0.5 makes the moves large. L(0) = (1, 2, 4): w stays 1/3.
    # L(1) = (0.5, 2, 2): L/L0 = (0.5, 1, 0.5), r = (1/4, 1/2, 1/4), w = r/2 + 1/6.
    # L(2) = (0.25, 1, 4): L/L0 = (0.25, 0.5, 1), r = (1/7, 2/7, 4/7), w = r/2 + w/2.
    anl = ANL(3, beta=1.0, rw=0.5)
    w1 = [0.125 + 1 / 6, 0.25 + 1 / 6, 0.125 + 1 / 6]
    w2 = [1 / 14 + w1[0] / 2, 1 / 7 + w1[1] / 2, 2 / 7 + w1[2] / 2]
    for losses, want in zip([(1, 2, 4), (0.5, 2, 2), (0.25, 1, 4)], [[1 / 3] * 3, w1, w2]):
        assert anl.update(torch.tensor(losses, dtype=torch.float32)).tolist() == pytest.approx(want, abs=1e-7)
    assert sum(w2) == pytest.approx(1.0)


def test_anl_matches_float64_reference_with_beta():
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(20, 4, generator=g, dtype=torch.float64) + 0.1
    anl = ANL(4, beta=2.0, rw=0.1, w0=[0.1, 0.2, 0.3, 0.4])
    w = [0.1, 0.2, 0.3, 0.4]
    for t in range(20):
        ratios = [(losses[t, i].item() / losses[0, i].item()) ** 2 for i in range(4)]
        w = [0.1 * r / sum(ratios) + 0.9 * wi for r, wi in zip(ratios, w)]
        assert anl.update(losses[t]).tolist() == pytest.approx(w, rel=1e-5)


def test_anl_equals_official_two_teacher_update():
    # zhaoshiji123/MTARD: w_nat <- w_nat - r_w (w_nat - r_nat), w_adv = 1 - w_nat, lr decay x0.1 on r_w.
    g = torch.Generator().manual_seed(0)
    seq = torch.rand(60, 2, generator=g) + 0.05
    anl = ANL(2)
    w_nat, rw, init = 0.5, 0.025, None
    for t, (l_adv, l_nat) in enumerate(seq.tolist()):
        if t == 30:
            rw *= 0.1
        anl.on_lr(0.1 if t >= 30 else 1.0)
        init = init or (l_adv, l_nat)
        a, n = l_adv / init[0], l_nat / init[1]
        w_nat = w_nat - rw * (w_nat - n / (a + n))
        w = anl.update([l_adv, l_nat])
        assert w.tolist() == pytest.approx([1 - w_nat, w_nat], abs=1e-6)


def test_anl_state_dict_continues_the_same_trajectory():
    seq = torch.rand(10, 3, generator=torch.Generator().manual_seed(2)) + 0.1
    a = ANL(3, rw=0.2)
    for t in range(5):
        a.update(seq[t])
    b = ANL(3, rw=0.2)
    b.load_state_dict(a.state_dict())
    for t in range(5, 10):
        assert torch.equal(a.update(seq[t]), b.update(seq[t]))


def test_anl_rejects_bad_settings():
    with pytest.raises(ValueError, match="r_w"):
        ANL(2, rw=0.0)
    with pytest.raises(ValueError, match="beta"):
        ANL(2, beta=-1)
    with pytest.raises(ValueError, match="expected 2 losses"):
        ANL(2).update([1.0, 2.0, 3.0])


def test_weights_are_constants_in_the_backward():
    # per-sample losses (2 branches x 3 samples); ANL reads their batch means, (2, 3) and (3, 1) -> (2, 2)
    losses = torch.tensor([[2.0, 3.0, 1.0], [3.0, 1.0, 2.0]], requires_grad=True)
    total, w = ANL(2).combine(losses, ctx_of(losses))
    total.backward()
    assert torch.equal(losses.grad, w[:, None].expand(2, 3) / 3)  # d total / d L_ib = w_i / B: weights are constants
    assert total.item() == pytest.approx(0.5 * 2 + 0.5 * 2)


def test_fixed_dwa_uw_rlw():
    assert Fixed([5 / 6, 1 / 6]).update([1.0, 1.0]).tolist() == pytest.approx([5 / 6, 1 / 6])
    assert Fixed(n=4).update([1.0] * 4).tolist() == pytest.approx([0.25] * 4)
    dwa = DWA(2, temperature=2.0)
    seen = []
    for epoch_losses in ([1.0, 1.0], [0.5, 0.9], [0.25, 0.9]):
        seen.append(dwa.update(epoch_losses).tolist())
        dwa.on_epoch_end()
    assert seen[:2] == [[1.0, 1.0]] * 2  # the first two epochs have no ratio: w = 1
    e0 = [math.exp(0.5 / 2), math.exp(0.9 / 2)]  # the third: r = L(2)/L(1) = (0.5, 0.9)
    assert seen[2] == pytest.approx([2 * e0[0] / sum(e0), 2 * e0[1] / sum(e0)], rel=1e-6)
    # after epochs e-2 = (0.5, 0.9), e-1 = (0.25, 0.9): r = (0.5, 1), w = 2 softmax(r / 2)
    e = [math.exp(0.25), math.exp(0.5)]
    assert dwa.update([1.0, 1.0]).tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)], rel=1e-6)
    uw = UncertaintyWeighting(2)
    losses = torch.tensor([[1.0, 1.0], [3.0, 3.0]], requires_grad=True)
    total, w = uw.combine(losses, ctx_of(losses))
    assert total.item() == pytest.approx(0.5 * 1 + 0.5 * 3)
    total.backward()
    assert uw.log_vars.grad.tolist() == pytest.approx([-0.5 * 1 + 0.5, -0.5 * 3 + 0.5])
    a, b = RandomLossWeighting(3, seed=4), RandomLossWeighting(3, seed=4)
    wa = a.update([1.0, 1.0, 1.0])
    assert torch.equal(wa, b.update([1.0, 1.0, 1.0])) and wa.sum().item() == pytest.approx(1.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.update([1, 1, 1]), b.update([1, 1, 1]))


class Confidence(Weighter):
    """A per-sample weighter for the test: w_ib = softmax over branches of the student's confidence in y."""

    def weigh(self, ctx: StepContext) -> torch.Tensor:
        conf = torch.stack([s.softmax(1).gather(1, ctx.y[:, None])[:, 0] for s in ctx.student])
        return conf.softmax(0) * self.n  # (N, B), each sample's weights sum to N


def test_a_per_sample_weighter_weighs_each_sample():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(2, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    student = [torch.randn(5, 3, generator=g) for _ in range(2)]
    ctx = StepContext(losses.detach(), y, student, [None, None])
    w8 = Confidence(2)
    total, reported = w8.combine(losses, ctx)
    w = w8.weigh(ctx)
    assert w.sum(0).tolist() == pytest.approx([2.0] * 5)  # as documented: N per sample
    assert total.item() == pytest.approx((w * losses).mean(1).sum().item())
    assert reported.tolist() == pytest.approx(w.mean(1).tolist())
    total.backward()
    assert torch.allclose(losses.grad, w / 5)


def test_a_weighter_of_the_wrong_shape_is_refused():
    class Bad(Weighter):
        def weigh(self, ctx):
            return torch.ones(2, 7)

    losses = torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"weights of shape \(2, 7\) for losses of shape \(2, 5\)"):
        Bad(2).combine(losses, ctx_of(losses))


def test_weighters_by_name_with_their_options():
    w = make_weighter({"name": "dwa", "temperature": 3.0}, 2)
    assert isinstance(w, DWA) and w.temperature == 3.0 and w.n == 2
    assert isinstance(make_weighter("anl", 3, beta=2.0), ANL) and make_weighter("anl", 3, beta=2.0).beta == 2.0
    assert make_weighter({"name": "anl", "beta": 5.0}, 2, beta=2.0).beta == 5.0  # the spec's options win
    assert set(WEIGHTERS) >= {"anl", "dwa", "fixed", "uw", "rlw"}
    with pytest.raises(ValueError, match="unknown weighter 'nope': choose one of .*anl, .*dwa, .*fixed, .*rlw, .*uw"):
        make_weighter("nope", 2)
    with pytest.raises(ValueError, match="weighter 'dwa' has no option 'rw': its options are temperature"):
        make_weighter({"name": "dwa", "rw": 0.1}, 2)
    with pytest.raises(ValueError, match="weighter 'dwa': temperature"):
        make_weighter({"name": "dwa", "temperature": "hot"}, 2)
