"""CUDA paths (fast path, CUDA graphs, bf16): skipped without a GPU, run on the device machine."""

import copy

import pytest
import torch

import multiteach as mt
from multiteach.data import TensorLoader, synthetic
from multiteach.fast import CapturedCall, FastTeacher, GraphedTransform, accelerate, fold_batchnorm
from multiteach.runtime import tf32
from tests.conftest import tiny_net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_captured_call_replays_the_eager_result(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels in and out of the graph
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    net = tiny_net().cuda().eval()
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    pgd = mt.PGD(steps=3, start="none")
    graphed = CapturedCall(lambda a, b, r: pgd(net, a, b, r))
    want = pgd(net, x, y)
    for _ in range(2):
        assert torch.allclose(graphed(x, y, None), want, atol=1e-6)
    x2 = torch.rand_like(x)
    assert torch.allclose(graphed(x2, y, None), pgd(net, x2, y), atol=1e-6)  # new inputs, same graph


@cuda
def test_folded_teacher_matches_in_fp32():
    t = mt.Teacher("cifar_resnet20").cuda()
    for m in t.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    with torch.no_grad(), tf32(False):  # cuDNN's default TF32 alone differs by ~5e-4
        assert torch.allclose(fold_batchnorm(t.model)(x), t(x), rtol=1e-4, atol=1e-4)


@cuda
def test_fast_path_trains_with_frozen_teachers(tmp_path):
    torch.manual_seed(0)
    recipe = mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()))
    before = [{k: v.clone().cuda() for k, v in t.model.state_dict().items()} for t in recipe.teachers]
    loader = TensorLoader(synthetic(512), 64, shuffle=True, augment=True, drop_last=True, device="cuda")
    cfg = mt.TrainConfig(epochs=3, batch_size=64, lr=0.1, milestones=[], progress=False, eval_every=0, log_every=1)
    res = mt.Trainer(recipe, loader, cfg, run_dir=tmp_path).fit()
    assert isinstance(recipe.branches[0].transform, GraphedTransform), "the attack should be graphed on CUDA"
    assert all(isinstance(t, FastTeacher) for t in recipe.teachers), "the teachers should be BN-folded on CUDA"
    losses = [r["loss"] for r in res.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for t, b in zip(recipe.teachers, before):  # the exact weights (a FastTeacher also holds its bf16 copy)
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, b[k]), k


def _trained_student():
    """A student trained a little (4 natural epochs), so that its CE depends on the input: a weaker attack
    would show as fewer successes (a random-init net's CE is ~ln 10 whatever the input)."""
    torch.manual_seed(0)
    net = tiny_net().cuda()
    loader = TensorLoader(synthetic(1024), 128, shuffle=True, augment=True, drop_last=True, device="cuda")
    cfg = mt.TrainConfig(epochs=4, batch_size=128, lr=0.1, milestones=[], progress=False, eval_every=0,
                         precision="fp32", fast=False)
    mt.Trainer(mt.presets.natural(net), loader, cfg).fit()
    return net


@cuda
def test_fast_step_matches_eager_on_a_trained_student():
    student = _trained_student()
    t_adv, t_nat = mt.Teacher(tiny_net(seed=1)).cuda(), mt.Teacher(tiny_net(seed=2)).cuda()
    eager = mt.presets.mtard(copy.deepcopy(student), copy.deepcopy(t_adv), copy.deepcopy(t_nat)).cuda().train()
    fast = mt.presets.mtard(copy.deepcopy(student), copy.deepcopy(t_adv), copy.deepcopy(t_nat)).cuda().train()
    accelerate(fast, "bf16")
    a = synthetic(256, seed=3)
    x = torch.from_numpy(a.x).cuda().permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(a.y).cuda()
    outs, grads, success = [], [], []
    for recipe in (eager, fast):
        with torch.autocast("cuda", torch.bfloat16):
            out = recipe(x, y)
        recipe.student.zero_grad()
        out.total.backward()
        outs.append(out.losses.float())
        grads.append(torch.cat([p.grad.flatten() for p in recipe.student.parameters()]))
        pgd = recipe.branches[0].transform
        x_adv = pgd(recipe.student, x, y)
        with torch.no_grad():
            success.append((recipe.student.eval()(x_adv).argmax(1) != y).float().mean().item())
        recipe.student.train()
    rel = ((outs[1] - outs[0]).abs() / outs[0].abs()).max().item()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert rel < 0.05 and cos > 0.95, (rel, cos)
    assert success[0] > 0.2 and abs(success[1] - success[0]) < 0.05, success


@cuda
def test_graphed_attack_follows_the_student_weights_and_its_settings():
    student = _trained_student().train()
    recipe = mt.presets.sat(student, steps=3, start="none", bn_mode="eval").cuda().train()  # the folded view
    accelerate(recipe, "bf16")
    g = recipe.branches[0].transform
    assert isinstance(g, GraphedTransform)
    a = synthetic(64, seed=4)
    x = torch.from_numpy(a.x).cuda().permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(a.y).cuda()
    with tf32(False):  # exact fp32 (kernels are chosen at recording): the folding's rounding alone may flip a
        g(student, x, y)  # sign where the gradient is ~0; recorded here
        with torch.no_grad():  # an optimizer step moves the weights in place: the next replay must see them
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        want = mt.PGD(steps=3, start="none")(student, x, y)
        got = g(student, x, y)
    assert (got == want).float().mean().item() > 0.95
    g.eps = 0.0  # a change of settings after the first step takes effect: eps 0 returns the clean batch
    assert torch.equal(g(student, x, y), x) and g.recorded == 2


@cuda
def test_a_cuda_run_stopped_after_an_epoch_resumes(tmp_path):
    """Resuming on the GPU: RNG states (the torch and CUDA generators, the loader's, RLW's) are restored from
    a checkpoint read onto the CPU; the fast path is rebuilt around the resumed student."""
    def run(epochs):
        torch.manual_seed(0)
        recipe = mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net(seed=1)), mt.Teacher(tiny_net(seed=2)), steps=2,
                                  weighter="rlw")
        loader = TensorLoader(synthetic(256), 64, shuffle=True, augment=True, drop_last=True, device="cuda")
        val = TensorLoader(synthetic(64, seed=5), 64, device="cuda")
        cfg = mt.TrainConfig(epochs=epochs, batch_size=64, lr=0.1, milestones=[], progress=False, eval_every=1,
                             eval_pgd_steps=2, ema_decay=0.9, log_every=1)
        return mt.Trainer(recipe, loader, cfg, val_loader=val, run_dir=tmp_path).fit()

    assert run(1).epoch == 1
    res = run(2)
    assert res.epoch == 2 and len(res.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"]))
                                                            for h in res.history)
