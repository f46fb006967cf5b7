import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.data import TensorLoader, synthetic
from multiteach.engine.optim import cycled_momentum
from multiteach.transforms import module_mode
from tests.conftest import tiny_net


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_linf_pgd_stays_in_ball_and_box_and_raises_the_loss(start):
    torch.manual_seed(0)
    model = tiny_net().eval()
    x, y = _batch()
    pgd = mt.PGD(eps=8 / 255, alpha=2 / 255, steps=10, start=start)
    x_adv = pgd(model, x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 1e-3


def test_l2_pgd_stays_in_ball():
    torch.manual_seed(0)
    model = tiny_net().eval()
    x, y = _batch()
    x_adv = mt.PGD(eps=0.5, alpha=0.1, steps=10, norm="L2")(model, x, y)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_kl_objective_moves_away_from_reference():
    torch.manual_seed(0)
    model = tiny_net().eval()
    with torch.no_grad():
        model.linear.weight.mul_(50)  # an untrained head is nearly flat; sharpen it so KL can move
    x, y = _batch()
    x_adv = mt.PGD(objective="kl", start="normal")(model, x, y)
    with torch.no_grad():
        ref = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(ref, 1), reduction="batchmean")
    assert kl > 1e-4


def test_attack_mode_is_restored_and_fgsm_is_one_step():
    model = tiny_net().train()
    x, y = _batch(4)
    mt.PGD(steps=2, bn_mode="eval")(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    with module_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    x_adv = mt.FGSM(eps=4 / 255)(model.eval(), x, y)
    d = (x_adv - x).abs()
    interior = (x > 4 / 255) & (x < 1 - 4 / 255)
    assert torch.allclose(d[interior], torch.full_like(d[interior], 4 / 255), atol=1e-6)  # one full sign step


def test_pgd_works_standalone_against_a_teacher():
    torch.manual_seed(0)
    teacher = mt.Teacher(tiny_net())
    x, y = _batch()
    x_adv = mt.PGD(steps=3)(teacher, x, y)
    assert not torch.equal(x_adv, x)


def test_bad_attack_settings_are_refused():
    with pytest.raises(ValueError, match="eps"):
        mt.PGD(eps=-1)
    with pytest.raises(ValueError, match="steps"):
        mt.PGD(steps=0)
    with pytest.raises(ValueError, match="start"):
        mt.PGD(start="gauss")


@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_wrn16_4", "cifar_mobilenetv2"])
def test_folded_eval_view_matches_eval_mode_and_follows_live_weights(name):
    """The fast path's BN-folded attack view: same logits and input gradients as the eval-mode student."""
    from multiteach.fast import FoldedEval

    torch.manual_seed(0)
    student = mt.create_model(name).train()
    x = torch.rand(4, 3, 32, 32)
    student(x)  # move the running statistics away from their init
    folded = FoldedEval(student)
    own = {id(p) for p in student.parameters()}
    assert folded.pairs and not any(p.requires_grad for p in folded.net.parameters() if id(p) not in own)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the student trains on...
    student(x)
    folded.refresh()  # ...and the view follows after a refresh
    xg = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    with module_mode(student, "eval"):
        want = student(xg)
        got = folded(xf)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    want.sum().backward()
    got.sum().backward()
    assert torch.allclose(xf.grad, xg.grad, rtol=1e-3, atol=1e-6)
    assert student.training  # the view never changes the student's mode


def test_nfgsm_is_one_unprojected_step_from_wide_noise_as_its_code():
    """N-FGSM against a float64 hand computation with the same draws: x0 = clamp(x + U(-2eps, 2eps)), one step of
    eps along sign(grad CE) taken in train mode, clamped to [0, 1] and not projected to the eps-ball."""
    x, y = _batch(32)
    net = tiny_net(seed=3).double().train()
    eps = 8 / 255
    ref = copy.deepcopy(net)
    torch.manual_seed(7)
    got = mt.NFGSM(eps)(net, x.double(), y)
    torch.manual_seed(7)
    start = (x.double() + torch.empty_like(x.double()).uniform_(-2 * eps, 2 * eps)).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(ref(start), y), [start])  # train mode, as the code
    want = (start.detach() + eps * grad.sign()).clamp(0, 1)
    assert torch.equal(got, want)
    delta = (got - x.double()).abs()
    assert delta.max() > 1.5 * eps and delta.max() <= 3 * eps + 1e-12  # beyond the eps-ball: no projection
    assert 0 <= got.min() and got.max() <= 1 and net.training  # its mode given back
    for a, b in zip(net.modules(), ref.modules()):  # the attack's forward moved BN statistics, as in the code
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.equal(a.running_mean, b.running_mean)
    clipped = mt.NFGSM(eps, clip=1.0)(net, x.double(), y)  # Fast AT's projection, if asked
    assert (clipped - x.double()).abs().max() <= eps + 1e-12
    assert mt.NFGSM().graph_safe and not mt.NFGSM(bn_mode="keep").graph_safe  # keep: the recorded mode replays


def test_the_nfgsm_schedule_is_torchs_cyclic_lr_with_its_momentum_cycle(tmp_path):
    """N-FGSM's code steps torch's CyclicLR(base_lr=0, max_lr, half the steps up, half down) with its default
    momentum cycle (0.9 at LR 0, 0.8 at the peak): the preset's schedule, step by step, and the trainer's SGD."""
    cfg = mt.ExperimentConfig(preset="nfgsm", train={"epochs": 4}).train
    assert (cfg.schedule, cfg.lr, cfg.momentum, cfg.cycle_momentum) == ("cyclic", 0.2, 0.9, 0.8)
    steps_per_epoch = 5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr, momentum=0.9)
    total = cfg.epochs * steps_per_epoch
    ref = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=cfg.lr, step_size_up=total // 2,
                                            step_size_down=total // 2)
    for i in range(total):
        factor = cfg.lr_factor(i / steps_per_epoch)
        g = opt.param_groups[0]
        assert (cfg.lr * factor, cycled_momentum(cfg, factor)) == (pytest.approx(g["lr"]), pytest.approx(g["momentum"]))
        opt.step()
        ref.step()
    assert cycled_momentum(mt.TrainConfig(schedule="cosine", milestones=[]), 0.5) is None  # only when asked
    two = mt.TrainConfig(epochs=2, batch_size=32, schedule="cyclic", milestones=[], cycle_momentum=0.8,
                         eval_every=0, device="cpu", progress=False)
    trainer = mt.Trainer(mt.presets.nfgsm(tiny_net(seed=0)), TensorLoader(synthetic(64, seed=0), 32), two,
                         run_dir=tmp_path)
    trainer.fit()  # its last step runs at epoch 1.5: LR factor 0.5, momentum halfway down
    assert trainer.optimizer.param_groups[0]["momentum"] == pytest.approx(0.85)
    for bad, match in (({"schedule": "cosine", "cycle_momentum": 0.8}, "cycle_momentum cycles SGD"),
                       ({"schedule": "cyclic", "warmup_epochs": 1.0}, "set warmup_epochs = 0"),
                       ({"schedule": "onecycle", "warmup_epochs": 1.0}, "set warmup_epochs = 0")):
        with pytest.raises(ValueError, match=match):
            mt.TrainConfig(milestones=[], **bad)


@pytest.mark.parametrize("preset", ["sat", "nfgsm", "natural"])
def test_adversarial_teachers_take_label_smoothing(preset):
    """A teacher-strength lever: the label-only presets smooth their CE when asked, and only then."""
    _, y = _batch(8)
    for smoothing in (0.0, 0.2):
        recipe = mt.presets.get_preset(preset).fn(tiny_net(seed=1), label_smoothing=smoothing)
        logits = torch.randn(8, 10)
        want = F.cross_entropy(logits, y, label_smoothing=smoothing, reduction="none")
        torch.testing.assert_close(recipe.branches[0].loss(logits, None, y), want)
