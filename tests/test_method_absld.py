"""ABSLD (zhaoshiji123/ABSLD): the loss with per-class teacher temperatures, the attack on the softened soft
labels, the per-class loss sums and the temperature update, each re-done by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods import absld as absld_mod
from multiteach.methods.absld import ClassTemperatureKL
from multiteach.presets import PRESETS
from tests.conftest import tiny_net
from tests.test_presets import batch, hand_pgd

T_ADV = torch.linspace(0.6, 3.0, 10)  # non-trivial temperatures, set before the step
T_NAT = torch.linspace(2.5, 0.7, 10)


def soft_kl(s, q):
    """KL(softmax(q) || softmax(s)) / C per sample, float64 (only the teacher's logits q are tempered)."""
    s, q = s.double(), q.double()
    p = F.softmax(q, 1)
    return (p * (F.log_softmax(q, 1) - F.log_softmax(s, 1))).mean(1)


def class_sums(values, y, C=10):
    return torch.zeros(C, dtype=torch.float64).index_add(0, y, values.double())


def hand_update(T, L, rate, t_min=0.5, t_max=5.0):
    gap = L - L.mean()
    return (T.double() - rate * gap / gap.abs().max()).clamp(t_min, t_max)


def test_absld_loss_attack_class_sums_and_one_update_by_hand():
    torch.manual_seed(0)
    s, t = tiny_net(), tiny_net().eval()
    recipe = PRESETS["absld"].fn(copy.deepcopy(s), mt.Teacher(copy.deepcopy(t)), steps=3)
    adv_kl, nat_kl = recipe.branches[0].loss, recipe.branches[1].loss
    adv_kl.temperature.copy_(T_ADV)
    nat_kl.temperature.copy_(T_NAT)
    x, y = batch()
    torch.manual_seed(3)
    out = recipe(x, y)

    with torch.no_grad():
        t_x = t(x)
    q_adv, q_nat = t_x / T_ADV[y, None], t_x / T_NAT[y, None]  # float32, as the attack reads them

    def kl_to(q):
        return lambda o: F.kl_div(F.log_softmax(o, 1), F.softmax(q, 1), reduction="sum")

    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, kl_to(q_adv), "normal", steps=3)
    with torch.no_grad():
        s_adv, s_nat = s(x_adv), s(x)  # train mode, in the recipe's order
    adv, nat = soft_kl(s_adv, q_adv), soft_kl(s_nat, q_nat)
    assert out.total.item() == pytest.approx((5 / 6 * adv.mean() + 1 / 6 * nat.mean()).item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.stack([adv.mean(), nat.mean()]).float(), rtol=1e-5, atol=1e-8)
    assert out.weights.tolist() == pytest.approx([5 / 6, 1 / 6])

    torch.manual_seed(3)  # the attack on the untempered soft labels (RSLAD's) is another attack
    assert not torch.allclose(hand_pgd(copy.deepcopy(s), x, kl_to(t_x), "normal", steps=3), x_adv)

    ce_adv = class_sums(F.cross_entropy(s_adv.double(), y, reduction="none"), y)
    ce_nat = class_sums(F.cross_entropy(s_nat.double(), y, reduction="none"), y)
    torch.testing.assert_close(adv_kl.class_loss, ce_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nat_kl.class_loss, ce_nat, rtol=1e-5, atol=1e-6)
    recipe.on_epoch_end()  # T <- clip(T - 0.1 (L - mean L) / max |L - mean L|, 0.5, 5), one table per term
    torch.testing.assert_close(adv_kl.temperature, hand_update(T_ADV, ce_adv, 0.1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nat_kl.temperature, hand_update(T_NAT, ce_nat, 0.1).float(), rtol=1e-5, atol=1e-6)
    assert adv_kl.class_loss.abs().sum() == 0 and adv_kl.epochs.item() == 1


def epoch_batches(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g))
            for _ in range(n)]


def test_temperature_trajectory_decays_clips_and_resumes_from_the_state_dict():
    """Three epochs with the rate's decay at milestone 2 (applied to the update that ends epoch 2, as the code
    decays before updating) and clips at both bounds; a copy loaded mid-epoch 2 follows the same trajectory."""
    def make():
        return ClassTemperatureKL(4, lr=3.0, t_min=0.5, t_max=2.0, milestones=(2,))

    a = make()
    T = torch.ones(4, dtype=torch.float64)
    epochs = [epoch_batches(k) for k in range(3)]
    clipped = set()
    b = None
    for e, batches in enumerate(epochs):
        L = torch.zeros(4, dtype=torch.float64)
        for i, (s, q, y) in enumerate(batches):
            if e == 1 and i == 1:  # resume mid-epoch: sums, temperatures and the epoch count come along
                b = make()
                b.load_state_dict(copy.deepcopy(a.state_dict()))
            loss = a(s, q, y)
            torch.testing.assert_close(loss.double(), soft_kl(s, q.double() / T.float().double()[y, None]),
                                       rtol=1e-5, atol=1e-7)
            if b is not None:
                torch.testing.assert_close(b(s, q, y), loss)
            L += class_sums(F.cross_entropy(s.double(), y, reduction="none"), y, 4)
        for m in (a, b) if b is not None else (a,):
            m.on_epoch_end()
        T = hand_update(T, L, 3.0 * (0.1 if e + 1 >= 2 else 1.0), 0.5, 2.0)
        clipped |= {v for v in T.tolist() if v in (0.5, 2.0)}
        torch.testing.assert_close(a.temperature, T.float())
        if b is not None:
            torch.testing.assert_close(b.temperature, a.temperature)
    assert clipped == {0.5, 2.0}


def test_epoch_sums_are_all_reduced(monkeypatch):
    other = torch.tensor([4.0, 0.0, 1.0, 9.0], dtype=torch.float64)  # a second rank's per-class sums
    monkeypatch.setattr(absld_mod, "epoch_sum", lambda t: t + other)
    m = ClassTemperatureKL(4)
    (s, q, y), = epoch_batches(7, 1)
    m(s, q, y)
    L = class_sums(F.cross_entropy(s.double(), y, reduction="none"), y, 4) + other
    m.on_epoch_end()
    torch.testing.assert_close(m.temperature, hand_update(torch.ones(4), L, 0.1).float())


def test_recipe_checkpoint_state_holds_both_tables():
    recipe = PRESETS["absld"].fn(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), steps=1)
    x, y = batch()
    recipe(x, y)
    recipe.on_epoch_end()
    recipe(x, y)  # a half-done epoch: its sums are state too
    fresh = PRESETS["absld"].fn(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), steps=1)
    fresh.load_component_state(copy.deepcopy(recipe.component_state()))
    for a, b in zip(recipe.loss_modules, fresh.loss_modules):
        assert torch.equal(a.temperature, b.temperature) and torch.equal(a.class_loss, b.class_loss)
        assert not torch.equal(a.temperature, torch.ones(10)) and b.epochs.item() == 1
