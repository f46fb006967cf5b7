"""Fair-ARD, Fair-RSLAD, Fair-MTARD (NISP-official/Fair-ARD): the surviving-step counts, the per-class weights
and the losses, each re-done by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import multiteach as mt
from multiteach.methods import fair_ard as fair
from multiteach.methods.fair_ard import ClassDifficultyWeights, SurvivalPGD
from multiteach.presets import PRESETS
from multiteach.weighting import ANL, Fixed, StepContext
from tests.conftest import tiny_net
from tests.test_presets import batch

EPS, ALPHA = 8 / 255, 2 / 255
CLASS_W = torch.linspace(0.9, 2.4, 10)  # non-uniform per-class weights, set before a step


def hand_pgd_count(model, x, y, objective, start, mode="eval", steps=10):
    """The official AttackPGD / inner loss: before each step, kappa += (prediction on the current point == y)."""
    model.train(mode == "train")
    if start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape)
    else:
        x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    kappa = torch.zeros(len(y), dtype=torch.long)
    for _ in range(steps):
        x_adv.requires_grad_()
        out = model(x_adv)
        kappa += out.max(1)[1] == y
        grad = torch.autograd.grad(objective(out), [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    model.train()
    return x_adv.detach(), kappa


def kl_rows(s, t, T=1.0):
    """KL(softmax(t/T) || softmax(s/T)) / C per sample, float64."""
    s, t = s.double(), t.double()
    p = F.softmax(t / T, 1)
    return (p * (torch.log(p) - F.log_softmax(s / T, 1))).mean(1)


def setup(preset, n_teachers, **kw):
    torch.manual_seed(0)
    student, teachers = tiny_net(), [tiny_net() for _ in range(n_teachers)]
    recipe = PRESETS[preset].fn(copy.deepcopy(student), *[mt.Teacher(copy.deepcopy(t)) for t in teachers], **kw)
    recipe.weighter.class_weights.copy_(CLASS_W)
    return recipe, student, [t.eval() for t in teachers]


def run(recipe, x, y):
    torch.manual_seed(3)
    return recipe(x, y)


def test_survival_pgd_counts_the_steps_each_sample_stays_correct():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():  # a linear model whose predictions flip at different steps
        net[1].weight.mul_(0.15)
        net[1].bias.copy_(torch.randn(10) * 0.5)
    x, y = batch()
    with torch.no_grad():
        y = torch.where(torch.arange(8) % 4 == 0, y, net(x).argmax(1))
    pgd = SurvivalPGD(start="uniform", bn_mode="train")
    torch.manual_seed(3)
    x_adv = pgd(net, x, y)
    torch.manual_seed(3)
    want_x, want_kappa = hand_pgd_count(net, x, y, lambda o: F.cross_entropy(o, y), "uniform", "train")
    assert torch.equal(pgd.survived, want_kappa)
    assert 2 < len(set(want_kappa.tolist())) and want_kappa.max() < 10  # intermediate counts: a real check
    torch.testing.assert_close(x_adv, want_x)
    torch.manual_seed(3)  # the same examples as the plain PGD
    torch.testing.assert_close(mt.PGD(start="uniform", bn_mode="train")(net, x, y), x_adv)


def test_fair_ard_is_class_weighted_t_squared_kl_with_train_mode_counts():
    recipe, s, (t,) = setup("fair_ard", 1, steps=3)
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    x_adv, kappa = hand_pgd_count(s, x, y, lambda o: F.cross_entropy(o, y), "uniform", "train", steps=3)
    with torch.no_grad():
        per_sample = 30.0 ** 2 * kl_rows(s(x_adv), t(x), 30.0)
    w = CLASS_W.double()[y]
    # float32 (as the official script computes it) cancels to ~1e-3 relative error at T = 30
    assert out.total.item() == pytest.approx((w * per_sample).mean().item(), rel=2e-3)
    assert out.losses.item() == pytest.approx(per_sample.mean().item(), rel=2e-3)
    assert out.weights.item() == pytest.approx(w.mean().item(), rel=1e-6)
    assert torch.equal(recipe.weighter.survived, torch.zeros(10, dtype=torch.long).index_add(0, y, kappa))
    assert recipe.weighter.seen.item() == 8


def test_fair_rslad_weights_both_kl_terms_per_class_and_counts_in_eval_mode():
    recipe, s, (t,) = setup("fair_rslad", 1, steps=3)
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        t_nat = t(x)
    kl_obj = lambda o: F.kl_div(F.log_softmax(o, 1), F.softmax(t_nat, 1), reduction="sum")  # noqa: E731
    x_adv, kappa = hand_pgd_count(s, x, y, kl_obj, "normal", steps=3)
    with torch.no_grad():
        adv, nat = kl_rows(s(x_adv), t_nat), kl_rows(s(x), t_nat)
    w = CLASS_W.double()[y]
    want = 5 / 6 * (w * adv).mean() + 1 / 6 * (w * nat).mean()
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.stack([adv.mean(), nat.mean()]).float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.weights, torch.tensor([5 / 6, 1 / 6]) * CLASS_W[y].mean())
    assert torch.equal(recipe.weighter.survived, torch.zeros(10, dtype=torch.long).index_add(0, y, kappa))


def test_fair_mtard_distils_clean_from_the_adv_teacher_and_feeds_anl_the_reweighted_losses():
    """The code: KL(T_adv(x') || S(x)) as the clean term, and ANL's ratios from the class-weighted batch losses
    (step 1 sets the initial losses; step 2 moves the weights)."""
    recipe, s, (t_adv, _) = setup("fair_mtard", 2, steps=3)
    batches = [batch(5), batch(6)]
    outs = [run(recipe, x, y) for x, y in batches]
    weighted, plain = [], []
    for x, y in batches:
        torch.manual_seed(3)
        x_adv, _ = hand_pgd_count(s, x, y, lambda o, y=y: F.cross_entropy(o, y), "normal", steps=3)
        with torch.no_grad():
            ta = t_adv(x_adv)
            per = torch.stack([kl_rows(s(x_adv), ta), kl_rows(s(x), ta)])
        weighted.append((per * CLASS_W.double()[y]).mean(1))
        plain.append(per.mean(1))

    def anl(losses):
        ratio = losses[1] / losses[0]
        return 0.025 * ratio / ratio.sum() + 0.975 * 0.5

    w2 = anl(weighted)
    assert outs[0].total.item() == pytest.approx((0.5 * weighted[0]).sum().item(), rel=1e-5)
    assert outs[1].total.item() == pytest.approx((w2 * weighted[1]).sum().item(), rel=1e-5)
    torch.testing.assert_close(outs[1].losses, plain[1].float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(recipe.weighter.base.weights, w2.float(), rtol=1e-6, atol=1e-7)
    assert (anl(plain) - w2).abs().max() > 1e-5  # ANL on the unweighted losses is another trajectory


def test_fair_mtard_nat_teacher_option_is_mtards_clean_term():
    recipe, s, (_, t_nat) = setup("fair_mtard", 2, steps=2, nat_target="nat_teacher")
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    x_adv, _ = hand_pgd_count(s, x, y, lambda o: F.cross_entropy(o, y), "normal", steps=2)
    s(x_adv)  # the recipe's adversarial forward (BN statistics), then the clean one
    with torch.no_grad():
        want = kl_rows(s(x), t_nat(x)).mean()
    assert out.losses[1].item() == pytest.approx(want.item(), rel=1e-5)


class FakeAttack:
    survived = None


def feed(w, y, kappa, losses=None):
    w.attack.survived = torch.tensor(kappa)
    losses = torch.rand(w.n, len(y), dtype=torch.float32) if losses is None else losses
    return w.weigh(StepContext(losses, torch.tensor(y)))


def hand_weights(kappa_sum, seen, C=4, beta=2.0, eps=1e-5):
    k = torch.tensor(kappa_sum, dtype=torch.float64) / (seen / C)
    w = (1 / (k + eps)) ** beta
    return (w * C / w.sum()).clamp(5 / 6, 5 / 2)


EPOCH1 = [([0, 1, 2, 3, 0], [9, 4, 1, 7, 10]), ([1, 2, 3, 3], [6, 0, 8, 9])]  # (labels, kappa) per batch


def test_class_weights_after_an_epoch_by_hand_with_both_clips():
    w = ClassDifficultyWeights(FakeAttack(), Fixed([0.5]), num_classes=4)
    for y, k in EPOCH1:
        assert torch.equal(feed(w, y, k), torch.full((1, len(y)), 0.5))  # first epoch: weights 1
    assert w.survived.tolist() == [19, 10, 1, 24] and w.seen.item() == 9
    w.on_epoch_end()
    want = hand_weights([19, 10, 1, 24], 9)
    torch.testing.assert_close(w.class_weights, want.float())
    assert want.min() == pytest.approx(5 / 6) and want.max() == pytest.approx(5 / 2)  # both bounds bite
    assert w.survived.sum() == 0 and w.seen == 0
    y = [3, 2, 0]
    torch.testing.assert_close(feed(w, y, [1, 1, 1]), 0.5 * want.float()[y][None])


def test_class_weights_and_inner_anl_resume_from_the_state_dict(monkeypatch):
    """Mid-epoch state (counts, weights, ANL's initial losses and weights) saved and loaded continues the same
    trajectory; the epoch's sums are all-reduced (a fake second rank adds its counts)."""
    torch.manual_seed(0)
    losses = [torch.rand(2, 5) + 0.5 for _ in range(5)]
    stream = [([0, 1, 2, 3, 0], [6, 4, 5, 7, 6]), ([1, 2, 3, 3, 0], [6, 5, 8, 5, 4]),
              ([2, 2, 1, 0, 3], [3, 5, 5, 9, 1]), ([0, 1, 2, 3, 1], [8, 2, 2, 6, 4]),
              ([3, 3, 2, 1, 0], [7, 9, 0, 3, 10])]
    other = torch.tensor([5, 3, 0, 9])  # a second rank's kappa sums, 4 samples
    monkeypatch.setattr(fair, "epoch_sum", lambda t: t + (other if t.dim() else 4))

    def make():
        return ClassDifficultyWeights(FakeAttack(), ANL(2, rw=0.3), num_classes=4)

    a = make()
    for (y, k), loss in zip(stream[:2], losses[:2]):
        feed(a, y, k, loss)
    a.on_epoch_end()
    want = hand_weights([16 + 5, 10 + 3, 10 + 0, 20 + 9], 10 + 4)
    torch.testing.assert_close(a.class_weights, want.float())
    assert ((want > 5 / 6 + 1e-3) & (want < 5 / 2 - 1e-3)).sum() == 2  # interior weights: the scale is checked
    feed(a, *stream[2], losses[2])
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for (y, k), loss in zip(stream[3:], losses[3:]):
        torch.testing.assert_close(feed(a, y, k, loss), feed(b, y, k, loss))
    a.on_epoch_end()
    b.on_epoch_end()
    torch.testing.assert_close(a.class_weights, b.class_weights)
    a.on_lr(0.1)
    assert a.base.rate_scale == 0.1  # ANL's rate follows the LR through the wrapper


def test_recipe_checkpoint_state_holds_the_class_weights():
    recipe, _, _ = setup("fair_rslad", 1, steps=1)
    x, y = batch()
    run(recipe, x, y)
    recipe.on_epoch_end()
    fresh = PRESETS["fair_rslad"].fn(tiny_net(), mt.Teacher(tiny_net()), steps=1)
    fresh.load_component_state(copy.deepcopy(recipe.component_state()))
    assert torch.equal(fresh.weighter.class_weights, recipe.weighter.class_weights)
    assert not torch.equal(fresh.weighter.class_weights, torch.ones(10))


def test_fair_ard_base_option_builds_the_variants():
    t = mt.Teacher(tiny_net())
    assert fair.fair_ard(tiny_net(), t, base="rslad", steps=1).name == "fair_rslad"
    assert fair.fair_ard(tiny_net(), t, mt.Teacher(tiny_net()), base="mtard", steps=1).name == "fair_mtard"
    with pytest.raises(ValueError, match="ARD's options"):
        fair.fair_ard(tiny_net(), t, base="rslad", temperature=4.0)
