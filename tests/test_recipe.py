import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.recipe import Branch, Recipe
from tests.conftest import tiny_net


class CountingPGD(mt.PGD):
    calls = 0

    def __call__(self, model, x, y, reference=None):
        CountingPGD.calls += 1
        return super().__call__(model, x, y, reference)


class CountingTeacher(mt.Teacher):
    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_shared_transform_runs_once_per_step_and_teachers_once_per_input():
    torch.manual_seed(0)
    pgd = CountingPGD(steps=2)
    t1, t2 = CountingTeacher(tiny_net()), CountingTeacher(tiny_net())
    recipe = Recipe(tiny_net(), [
        Branch(pgd, mt.KLDistill(), teacher=t1, name="a"),
        Branch(pgd, mt.KLDistill(), teacher=t2, name="b"),
        Branch(mt.Clean(), mt.KLDistill(), teacher=t1, name="c"),
        Branch(mt.Clean(), mt.CrossEntropy(), name="d"),
    ], mt.ANL(4))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    CountingPGD.calls = 0
    for _ in range(3):
        out = recipe(x, y)
    assert CountingPGD.calls == 3  # one attack per step, however many branches read it
    assert (t1.calls, t2.calls) == (6, 3)  # t1 on x_adv and x; t2 on x_adv
    assert out.losses.shape == (4,) and out.weights.shape == (4,)


def test_mtard_step_equals_the_official_step(mtard_recipe):
    """The preset's losses equal zhaoshiji123/MTARD's step, re-done by hand on copies of the same nets."""
    g = torch.Generator().manual_seed(5)
    x, y = 0.1 + 0.8 * torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    student = copy.deepcopy(mtard_recipe.student)
    adv, nat = (copy.deepcopy(t.model) for t in mtard_recipe.teachers)
    torch.manual_seed(3)
    out = mtard_recipe(x, y)

    torch.manual_seed(3)
    student.eval()
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(10):
        x_adv.requires_grad_()
        grad = torch.autograd.grad(F.cross_entropy(student(x_adv), y), [x_adv])[0]
        x_adv = x_adv.detach() + 2 / 255 * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - 8 / 255), x + 8 / 255).clamp(0, 1)
    student.train()
    s_adv, s_nat = student(x_adv), student(x)
    with torch.no_grad():
        t_adv, t_nat = adv.eval()(x_adv), nat.eval()(x)

    def kl(s, t):  # the official kl_loss, without its +1e-5 inside the log
        p = F.softmax(t, 1)
        return (-F.log_softmax(s, 1) * p + torch.log(p) * p).mean()

    want = torch.stack([kl(s_adv, t_adv), kl(s_nat, t_nat)])
    assert torch.allclose(out.losses, want.detach(), rtol=1e-5, atol=1e-8)
    assert out.weights.tolist() == [0.5, 0.5]  # first step: r = (1/2, 1/2)
    assert out.total.item() == pytest.approx(0.5 * want.sum().item(), rel=1e-5)
    for a, b in zip(mtard_recipe.student.state_dict().values(), student.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)  # same BN statistics updates, in the same order


def test_class_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="classes"):
        mt.presets.mtard(tiny_net(10), mt.Teacher(tiny_net(100)), mt.Teacher(tiny_net(10)))


def test_teachers_stay_frozen_through_training(toy_loader, mtard_recipe):
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in mtard_recipe.teachers]
    cfg = mt.TrainConfig(epochs=1, batch_size=32, lr=0.1, steps_per_epoch=3, progress=False, eval_every=0)
    mt.Trainer(mtard_recipe, toy_loader, cfg).fit()
    for t, b in zip(mtard_recipe.teachers, before):
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():
            assert torch.equal(v, b[k]), k  # weights and BN running stats byte-identical
    assert any(m.training for m in mtard_recipe.student.modules())
