"""CUDA paths (fast path, CUDA graphs, bf16): skipped without a GPU, run on the device machine."""

import pytest
import torch

import multiteach as mt
from multiteach.data import TensorLoader, synthetic
from multiteach.fast import CapturedCall, fold_batchnorm
from tests.conftest import tiny_net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_captured_call_replays_the_eager_result():
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
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(t.model)(x), t(x), rtol=1e-4, atol=1e-4)


@cuda
def test_fast_path_trains_with_frozen_teachers(tmp_path):
    torch.manual_seed(0)
    recipe = mt.presets.mtard(tiny_net(), mt.Teacher(tiny_net()), mt.Teacher(tiny_net()))
    before = [{k: v.clone().cuda() for k, v in t.state_dict().items()} for t in recipe.teachers]
    loader = TensorLoader(synthetic(512), 64, shuffle=True, augment=True, drop_last=True, device="cuda")
    cfg = mt.TrainConfig(epochs=3, batch_size=64, lr=0.1, milestones=[], progress=False, eval_every=0, log_every=1)
    res = mt.Trainer(recipe, loader, cfg, run_dir=tmp_path).fit()
    assert recipe.runners, "the fast path should graph the attack and the teachers on CUDA"
    losses = [r["loss"] for r in res.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for t, b in zip(recipe.teachers, before):
        for k, v in t.state_dict().items():
            assert torch.equal(v, b[k]), k
