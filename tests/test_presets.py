"""Each preset's loss equals its paper's formula, re-done by hand on copies of the same nets and batch."""

import copy
import math

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


def hand_pgd(model, x, objective, start, steps=10, mode="eval", eps=EPS, alpha=ALPHA):
    """Sign-gradient ascent of ``objective(logits)`` in the L-inf ball, as the official scripts write it."""
    model.train(mode == "train")
    if start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape)
    else:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        grad = torch.autograd.grad(objective(model(x_adv)), [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv.detach()


def kl(s, t, T=1.0, reduction="mean"):
    """KL(softmax(t/T) || softmax(s/T)) elementwise, then mean over batch x classes or over the batch."""
    s, t = s.double(), t.double()  # float64: at T = 30 the float32 terms cancel to ~1e-4 relative error
    p = F.softmax(t / T, 1)
    e = p * (torch.log(p) - F.log_softmax(s / T, 1))
    return e.mean() if reduction == "mean" else e.sum() / len(s)


def setup(preset, n_teachers=0, **kw):
    torch.manual_seed(0)
    student, teachers = tiny_net(), [tiny_net() for _ in range(n_teachers)]
    recipe = PRESETS[preset].fn(copy.deepcopy(student), *[mt.Teacher(copy.deepcopy(t)) for t in teachers], **kw)
    return recipe, student, [t.eval() for t in teachers]


def run(recipe, x, y):
    torch.manual_seed(3)
    return recipe(x, y)


def test_natural_is_cross_entropy():
    recipe, s, _ = setup("natural")
    x, y = batch()
    assert run(recipe, x, y).total.item() == pytest.approx(F.cross_entropy(s.train()(x), y).item(), rel=1e-5)


def test_sat_is_ce_on_pgd10_uniform_start_examples():
    """Madry's PGD-AT as the MadryLab code runs it: the attack sees the student's BatchNorm in train mode."""
    recipe, s, _ = setup("sat")
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, lambda o: F.cross_entropy(o, y), "uniform", mode="train")
    assert out.total.item() == pytest.approx(F.cross_entropy(s(x_adv), y).item(), rel=1e-5)


def test_trades_is_ce_plus_six_kl_batchmean():
    recipe, s, _ = setup("trades")
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = s.eval()(x)
    x_adv = hand_pgd(s, x, lambda o: F.kl_div(F.log_softmax(o, 1), F.softmax(ref, 1), reduction="sum"), "normal",
                     eps=0.031, alpha=0.007)  # the TRADES repository's attack
    s_nat = s(x)
    want = F.cross_entropy(s_nat, y) + 6.0 * kl(s(x_adv), s_nat, reduction="batchmean")
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.weights.tolist() == [1.0, 6.0]


def test_ard_is_t_squared_kl_at_t30_with_the_attack_in_train_mode():
    recipe, s, (t,) = setup("ard", 1)
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, lambda o: F.cross_entropy(o, y), "uniform", mode="train")
    with torch.no_grad():
        t_nat = t(x)
    want = 30.0 ** 2 * kl(s(x_adv), t_nat, T=30.0)
    # float32 (as the official script computes it) cancels to ~1e-4 relative error at T = 30
    assert out.total.item() == pytest.approx(want.item(), rel=5e-4)


def test_rslad_is_five_sixths_adv_kl_plus_one_sixth_clean_kl_to_the_teachers_clean_output():
    recipe, s, (t,) = setup("rslad", 1)
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        t_nat = t(x)
    x_adv = hand_pgd(s, x, lambda o: F.kl_div(F.log_softmax(o, 1), F.softmax(t_nat, 1), reduction="sum"), "normal")
    want = 5 / 6 * kl(s(x_adv), t_nat) + 1 / 6 * kl(s(x), t_nat)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("preset", ["baseline", "baseline_mt", "mtard3"])
def test_ablations_and_three_teachers(preset):
    n = {"baseline": 1, "baseline_mt": 2, "mtard3": 3}[preset]
    kw = {"l2_eps": 0.5, "l2_alpha": 0.1} if preset == "mtard3" else {}
    recipe, s, teachers = setup(preset, n, **kw)
    x, y = batch()
    out = run(recipe, x, y)
    torch.manual_seed(3)  # the recipe's draws, in its order: the L-inf start, then (mtard3) the L2 start
    x_adv = hand_pgd(s, x, lambda o: F.cross_entropy(o, y), "normal")
    inputs = [x_adv, x][:n]
    if n == 3:  # L2 PGD-10 from x + 0.001 N(0, 1), step 0.1 along the normalized gradient, eps 0.5
        s.eval()
        b = x + 0.001 * torch.randn(x.shape)
        for _ in range(10):
            b.requires_grad_()
            g = torch.autograd.grad(F.cross_entropy(s(b), y, reduction="sum"), [b])[0]
            b = b.detach() + 0.1 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = b - x
            b = (x + d * (0.5 / d.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)).clamp(0, 1)
        inputs.append(b)
    s.train()
    with torch.no_grad():
        want = torch.stack([kl(s(xi), t(xi)) for xi, t in zip(inputs, teachers)])
    torch.testing.assert_close(out.losses, want.float(), rtol=1e-5, atol=1e-8)
    assert out.weights.tolist() == pytest.approx({1: [1.0], 2: [0.5, 0.5], 3: [1 / 3] * 3}[n])


def test_bmtard_moves_temperatures_by_the_entropy_ratio():
    """B-MTARD: the teacher with the more uncertain output is sharpened (T down, clipped at 1), the other
    softened (T up by 0.001); the next step's targets are the teachers' logits over their temperatures."""
    recipe, s, (adv, nat) = setup("bmtard", 2)
    x, y = batch()
    run(recipe, x, y)
    torch.manual_seed(3)
    x_adv = hand_pgd(s, x, lambda o: F.cross_entropy(o, y), "normal")

    def entropy(logits):
        p = F.softmax(logits, 1)
        return -(p * F.log_softmax(logits, 1)).sum(1).mean()

    with torch.no_grad():
        h = [entropy(adv(x_adv)), entropy(nat(x))]
    want = [min(max(1.0 - 0.001 * math.copysign(1, h[k] / h[1 - k] - 1), 1.0), 10.0) for k in range(2)]
    assert recipe.balance.temperatures.tolist() == pytest.approx(want)
    assert sorted(want) == [1.0, 1.001]


def test_bmtard_logs_each_teachers_temperature_by_branch(tmp_path):
    """The run log keeps the temperatures the balance moved (the paper's T_k(t)): by branch name at each epoch's
    end, as the balance holds them then, in the epoch's summary line and on weights.png."""
    import json

    from multiteach.data import TensorLoader, synthetic
    from multiteach.engine.runlog import epoch_line
    from multiteach.plots import plot_run

    recipe, _, _ = setup("bmtard", 2, steps=1, temperature_lr=0.05)  # 0.05 per step: 4 steps move T visibly
    loader = TensorLoader(synthetic(64, seed=0), 32, shuffle=True, drop_last=True, seed=0)
    cfg = mt.TrainConfig(epochs=2, batch_size=32, lr=0.05, milestones=[], log_every=1, progress=False, eval_every=0)
    mt.Trainer(recipe, loader, cfg, run_dir=tmp_path).fit()
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [list(r["T"]) for r in epochs] == [["adv", "nat"]] * 2
    assert list(epochs[-1]["T"].values()) == pytest.approx(recipe.balance.temperatures.tolist(), rel=1e-6)
    assert epochs[-1]["T"] != epochs[0]["T"] and max(epochs[-1]["T"].values()) > 1.0  # moved, and logged as moved
    assert "T_adv=" in epoch_line(epochs[-1], ["adv", "nat"])
    assert (tmp_path / "weights.png") in plot_run(tmp_path, tmp_path)
    assert mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net())).temperatures() == {}
    ciard, _, _ = setup("ciard", 2)  # two temperatures over three logit targets: the push term's is not softened
    assert ciard.logit_target_names[:2] == ["adv", "nat"] and len(ciard.logit_target_names) == 3
    assert list(ciard.temperatures()) == ["adv", "nat"]


def test_every_preset_takes_a_cpu_step_with_finite_losses():
    x, y = batch()
    for name, info in PRESETS.items():
        recipe, _, _ = setup(name, len(info.teachers), **({"steps": 2} if "steps" in info.options() else {}))
        out = recipe(x, y)
        assert torch.isfinite(out.total) and torch.isfinite(out.losses).all(), name
        out.total.backward()
        assert all(p.grad is not None for p in recipe.student.parameters()), name


def test_three_teacher_recipe_trains(toy_loader):
    """N = 3 through the trainer: the loss falls and ANL moves three weights that stay on the simplex."""
    recipe, _, _ = setup("mtard3", 3, steps=2)
    trainer = mt.Trainer(recipe, toy_loader, mt.TrainConfig(epochs=3, batch_size=32, lr=0.05, progress=False,
                                                             eval_every=0, schedule="cosine", milestones=[]))
    first = recipe(*next(iter(toy_loader))).losses.sum().item()
    trainer.fit()
    x, y = next(iter(toy_loader))
    out = recipe(x, y)
    assert out.losses.sum().item() < first
    assert out.weights.sum().item() == pytest.approx(1.0) and not torch.allclose(out.weights, torch.full((3,), 1 / 3))
