"""AVER, EBKD, CA-MKD and AE-KD (Rorozhl/CA-MKD, AnTuo1998/AE-KD): each loss, its weights and (CA-MKD) its
feature term re-done by hand in float64 on copies of the same nets and batch."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.ensemble import (
    ConfidenceWeights,
    EntropyWeights,
    GradientMinNorm,
    Groups,
    avg_kd_teachers,
    ca_mkd_teachers,
    capped_min_norm,
    ebkd_teachers,
    final_feature,
)
from multiteach.methods.mtard import multi_teacher
from multiteach.models import CifarResNet, WideResNet
from multiteach.presets import PRESETS
from multiteach.registry import WEIGHTERS
from multiteach.weighting import Fixed, StepContext, UncertaintyWeighting, make_weighter
from tests.conftest import hinton_kd_rows, image_batch, tiny_net

T = 4.0


def batch(seed: int = 5, n: int = 8):
    return image_batch(seed, n)


def kd_rows(s, t):
    """Per-sample T^2 KL at T (DistillKL(is_ca=True)), float64."""
    return hinton_kd_rows(s, t, T)


def ce_rows(logits, y):
    return F.cross_entropy(logits.double(), y, reduction="none")


def sharp(net, factor):
    """An untrained net's logits scaled by ``factor``: teachers of different (and per-sample varying) confidence."""
    with torch.no_grad():
        net.get_classifier().weight.mul_(factor)
        net.get_classifier().bias.mul_(factor)
    return net


def build(preset, teachers=None, **kw):
    """The preset on copies of the student and teachers; returns (recipe, student, teachers) for the hand side."""
    student = tiny_net(seed=0)
    teachers = teachers or [sharp(tiny_net(seed=k), f) for k, f in ((1, 20.0), (2, 40.0), (3, 80.0))]
    recipe = PRESETS[preset].fn(copy.deepcopy(student), *[mt.Teacher(copy.deepcopy(t)) for t in teachers], **kw)
    return recipe.train(), student.train(), [t.eval() for t in teachers]


def teacher_logits(teachers, x):
    with torch.no_grad():
        return [t(x) for t in teachers]


# ----------------------------------------------------------------------------- AVER, EBKD
def test_avg_kd_is_ce_plus_the_mean_of_t_squared_kd_terms_at_t4():
    recipe, s, teachers = build("avg_kd")
    x, y = batch()
    out = recipe(x, y)
    z = s(x)
    kd = [kd_rows(z, t).mean() for t in teacher_logits(teachers, x)]
    want = ce_rows(z, y).mean() + sum(kd) / 3
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.stack([ce_rows(z, y).mean(), *kd]).float(), rtol=1e-5, atol=1e-7)
    assert out.weights.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert PRESETS["avg_kd"].teachers == ("t1", "t2", "t3")
    assert PRESETS["avg_kd"].schedule == {"epochs": 240, "milestones": (150, 180, 210)}


def test_ebkd_weighs_each_sample_by_one_minus_its_teacher_entropy_share_over_k():
    recipe, s, teachers = build("ebkd")
    x, y = batch()
    out = recipe(x, y)
    z = s(x)
    logits = teacher_logits(teachers, x)
    h = torch.stack([-(F.softmax(t.double(), 1) * F.log_softmax(t.double(), 1)).sum(1) for t in logits])  # T = 1
    w = 1.0 - h / h.sum(0)  # (K, B), per sample; the code then divides the weighted sum by B * K
    kd = torch.stack([kd_rows(z, t) for t in logits])
    want = ce_rows(z, y).mean() + (w * kd).sum() / (len(y) * 3)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.weights.tolist() == pytest.approx([1.0, *(w.mean(1) / 3).tolist()], rel=1e-5)
    assert torch.allclose(w.sum(0), torch.full((len(y),), 2.0, dtype=torch.float64))  # K - 1
    assert not torch.allclose(w[:, 0], w[:, 1])  # per sample, not per batch


# ----------------------------------------------------------------------------- CA-MKD
def _layer_hook(model, name, store):
    return model.get_submodule(name).register_forward_hook(lambda m, i, o: store.__setitem__(name, o))


def _projector_params(hint):
    conv, bn = hint.projector[0], hint.projector[1]
    return [p.detach().clone().requires_grad_(True) for p in (conv.weight, conv.bias, bn.weight, bn.bias)], bn.eps


@pytest.mark.parametrize("student_stages", [2, 3])  # the student's map is pooled down / upsampled to each teacher's
def test_ca_mkd_weighs_kd_and_features_by_teacher_confidence_as_its_code(student_stages):
    torch.manual_seed(0)
    student = tiny_net(seed=0) if student_stages == 2 else CifarResNet((1, 1, 1), (8, 16, 32))
    torch.manual_seed(1)
    wrn = WideResNet(10, 1)
    teachers = [sharp(tiny_net(seed=2), 20.0), sharp(wrn, 40.0), sharp(CifarResNet((1, 1, 1), (8, 16, 32)), 80.0)]
    t_layers, t_relu = ["layer2", "bn1", "layer3"], [False, True, False]  # WRN: relu(bn1) is its last map
    s_layer = "layer2" if student_stages == 2 else "layer3"
    recipe = PRESETS["ca_mkd"].fn(copy.deepcopy(student), *[mt.Teacher(copy.deepcopy(t)) for t in teachers]).train()
    assert [b.teacher_layer for b in recipe.branches[4:]] == t_layers
    assert all(b.student_layer == s_layer for b in recipe.branches[4:])
    hints = [b.loss for b in recipe.branches[4:]]
    params = [_projector_params(h) for h in hints]  # the projectors' initial weights, copied for the hand side
    x, y = batch()
    recipe.epoch = 1  # the code adds the feature term from its second epoch on
    out = recipe(x, y)
    out.total.backward()

    student.train()
    feats = {}
    hook = _layer_hook(student, s_layer, feats)
    z = student(x)
    hook.remove()
    f_s = feats[s_layer]
    t_logits, t_feats = [], []
    with torch.no_grad():
        for t, name, relu in zip(teachers, t_layers, t_relu):
            t.eval()
            store = {}
            h = _layer_hook(t, name, store)
            t_logits.append(t(x))
            h.remove()
            t_feats.append(F.relu(store[name]) if relu else store[name])
    w = (1.0 - torch.softmax(torch.stack([ce_rows(t, y) for t in t_logits]), 0)) / 2  # (K, B)
    kd = torch.stack([kd_rows(z, t) for t in t_logits])
    mse, head_ce = [], []
    for (p, eps), t, f_t in zip(params, teachers, t_feats):
        size = f_t.shape[2:]
        r = F.adaptive_avg_pool2d(f_s, size) if f_s.shape[2] >= size[0] else \
            F.interpolate(f_s, size=size, mode="bilinear")
        proj = F.relu(F.batch_norm(F.conv2d(r, p[0], p[1]), None, None, p[2], p[3], training=True, eps=eps))
        mse.append((proj.double() - f_t.double()).pow(2).flatten(1).mean(1))
        head_ce.append(ce_rows(t.get_classifier()(proj.mean((2, 3))), y))  # the teacher's head on the student
    v = (1.0 - torch.softmax(torch.stack(head_ce), 0)) / 2  # with its gradient, as the code
    mse = torch.stack(mse)
    ce = ce_rows(z, y)
    want = ce.mean() + (w * kd).sum() / (len(y) * 3) + 50 * (v * mse).sum() / (len(y) * 3)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.losses, torch.cat([ce.mean()[None], kd.mean(1), mse.mean(1)]).float(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.weights.double(), torch.cat([torch.ones(1, dtype=torch.float64),
                                                                w.mean(1) / 3, 50 * v.detach().mean(1) / 3]),
                               rtol=1e-5, atol=1e-7)
    # the gradient: through the feature weights v too (the KD weights w come from frozen teachers); the
    # projectors train with the student; the teachers get none
    want.backward()
    for mine, hand in zip(recipe.student.parameters(), student.parameters()):
        torch.testing.assert_close(mine.grad, hand.grad, rtol=1e-4, atol=1e-6)
    for hint, (p, _) in zip(hints, params):
        conv, bn = hint.projector[0], hint.projector[1]
        for mine, hand in zip((conv.weight, conv.bias, bn.weight, bn.bias), p):
            torch.testing.assert_close(mine.grad, hand.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for t in recipe.teachers for p in t.parameters())
    extra = {id(p) for p in recipe.trainable_parameters()[1]}
    assert all(id(p) in extra for h in hints for p in h.projector.parameters())


def test_ca_mkd_leaves_the_feature_term_out_in_the_first_epoch():
    recipe, s, teachers = build("ca_mkd")
    x, y = batch()
    first = recipe(x, y)
    assert first.weights[4:].tolist() == [0.0, 0.0, 0.0] and (first.losses[4:] > 0).all()
    recipe.epoch = 1
    assert (recipe(x, y).weights[4:] > 0).all()
    now = PRESETS["ca_mkd"].fn(tiny_net(seed=0), *[mt.Teacher(tiny_net(seed=k)) for k in (1, 2, 3)],
                               feature_from_epoch=0).train()
    assert (now(x, y).weights[4:] > 0).all()
    logits_only = PRESETS["ca_mkd"].fn(tiny_net(seed=0), *[mt.Teacher(tiny_net(seed=k)) for k in (1, 2, 3)],
                                       feature_weight=0)
    assert logits_only.branch_names == ["ce", "kd_t1", "kd_t2", "kd_t3"]


def test_final_feature_is_the_map_each_cifar_model_pools_into_its_classifier():
    import multiteach.models  # noqa: F401  (registers the CIFAR models in timm)

    want = {"cifar_resnet20": ("layer3", False), "cifar_wrn16_4": ("bn1", True), "cifar_mobilenetv2": ("bn2", True)}
    for name, layer in want.items():
        assert final_feature(mt.teachers.create_model(name), None) == layer, name
    assert final_feature(tiny_net(), None) == ("layer2", False)
    with pytest.raises(ValueError, match="student_layer/teacher_layers"):
        final_feature(tiny_net(), "layer1")  # not the map its classifier pools


# ----------------------------------------------------------------------------- AE-KD
def grid_min(gram, cap, step=1e-3):
    """Brute force for three weights: the least w^T G w over a grid of the capped simplex."""
    a = torch.arange(0, 1 + step / 2, step, dtype=torch.float64)
    w1, w2 = torch.meshgrid(a, a, indexing="ij")
    w = torch.stack([w1.flatten(), w2.flatten(), 1 - w1.flatten() - w2.flatten()], 1)
    w = w[((w >= -1e-12) & (w <= cap + 1e-12)).all(1)]
    value = torch.einsum("pi,ij,pj->p", w, gram, w)
    return w[value.argmin()], value.min()


def assert_kkt(w, gram, cap, tol=1e-7):
    """Optimality of the convex problem: the gradient G w is equal on the free weights, no smaller on those at
    zero and no larger on those at the cap."""
    r = gram @ w
    free = (w > 1e-9) & (w < cap - 1e-9)
    lam = r[free].mean() if free.any() else None
    if lam is not None:
        assert torch.allclose(r[free], lam.expand(int(free.sum())), atol=tol)
        assert (r[w <= 1e-9] >= lam - tol).all() and (r[w >= cap - 1e-9] <= lam + tol).all()
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all() and (w <= cap + 1e-12).all()


def test_capped_min_norm_is_the_least_norm_point_of_the_capped_simplex():
    g = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # orthogonal gradients of norms 1 and 2
    assert capped_min_norm(g, 1.0).tolist() == pytest.approx([0.8, 0.2])  # the plain min-norm point
    assert capped_min_norm(g, 0.6).tolist() == pytest.approx([0.6, 0.4])  # capped by the tolerance
    assert capped_min_norm(torch.zeros(3, 3, dtype=torch.float64), 0.6).tolist() == pytest.approx([1 / 3] * 3)
    assert capped_min_norm(torch.ones(1, 1), 1.0).tolist() == pytest.approx([1.0])
    torch.manual_seed(0)
    for k, cap in itertools.product((3, 4), (0.4, 0.6, 1.0)):
        for _ in range(3):
            v = torch.randn(k, 6, dtype=torch.float64) + torch.randn(6, dtype=torch.float64)  # correlated
            gram = v @ v.T
            w = capped_min_norm(gram, cap)
            assert_kkt(w, gram, cap)
            if k == 3:
                best, value = grid_min(gram, cap, step=2e-3)
                assert (w @ gram @ w).item() <= value.item() + 1e-12
                assert torch.allclose(w, best, atol=4e-3)
    same = torch.ones(3, 3, dtype=torch.float64)  # identical gradients: a singular Gram matrix
    w = capped_min_norm(same, 0.6)
    assert w.sum().item() == pytest.approx(1.0) and (w <= 0.6 + 1e-12).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_aekd_weights_are_the_capped_min_norm_point_of_the_teachers_logit_gradients(normalize):
    recipe, s, teachers = build("aekd", normalize=normalize)
    x, y = batch()
    out = recipe(x, y)
    z = s(x)
    logits = teacher_logits(teachers, x)
    # d/dz of T^2 KL batchmean is T (softmax(z/T) - softmax(t/T)) / B per row; the code averages the rows
    g = torch.stack([(T * (F.softmax(z.double() / T, 1) - F.softmax(t.double() / T, 1)) / len(y)).mean(0)
                     for t in logits]).detach()
    norms = g.norm(dim=1)
    u = g / norms[:, None] if normalize else g
    gram = u @ u.T
    w = capped_min_norm(gram, 0.6)  # exact; the brute-force grid and the KKT conditions check it
    assert torch.allclose(w, grid_min(gram / gram.diagonal().max(), 0.6)[0], atol=2e-3)
    assert_kkt(w, gram / gram.diagonal().max(), 0.6)
    if normalize:  # the code's --svm_norm: weights divided by the gradients' norms, renormalised
        w = w / norms
        w = w / w.sum()
    kd = torch.stack([kd_rows(z, t).mean() for t in logits])
    want = ce_rows(z, y).mean() + 0.9 * (w * kd).sum()
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.weights.tolist() == pytest.approx([1.0, *(0.9 * w).tolist()], rel=1e-5, abs=1e-7)
    assert len(set(out.weights[1:].tolist())) == 3  # the teachers are weighed apart


def test_aekd_caps_follow_the_codes_nu_clipping():
    assert GradientMinNorm(3, tolerance=0.6).cap == pytest.approx(0.6)
    assert GradientMinNorm(3, tolerance=0.2).cap == pytest.approx(1 / 3)  # nu > 1 is clipped to 1: uniform
    assert GradientMinNorm(3, tolerance=5.0).cap == pytest.approx(1.0)  # nu < 1/m is clipped to 1/m
    with pytest.raises(ValueError, match="at most 10"):
        GradientMinNorm(11)


# ----------------------------------------------------------------------------- composition, registry, any K
def test_groups_slice_scale_start_late_and_spread_batch_weights_over_samples():
    torch.manual_seed(0)
    logits = [torch.randn(4, 10) for _ in range(3)]
    y = torch.randint(0, 10, (4,))
    ctx = StepContext(torch.rand(4, 4), y, [None] + logits, [None] + logits, epoch=0)
    groups = Groups([(Fixed([2.0]), 1.0), (EntropyWeights(3), 0.5, 1)])
    w = groups.weigh(ctx)
    assert w.shape == (4, 4) and w[0].tolist() == [2.0] * 4 and w[1:].abs().sum() == 0  # before epoch 1
    ctx.epoch = 1
    w = groups.weigh(ctx)
    sub = StepContext(ctx.losses[1:], y, logits, logits, epoch=1)
    torch.testing.assert_close(w[1:], 0.5 * EntropyWeights(3).weigh(sub))
    with pytest.raises(ValueError, match="combines its losses itself"):
        Groups([(UncertaintyWeighting(2), 1.0)])


def test_the_weighters_are_registered_and_weigh_multi_teacher_branches():
    for name, cls in (("ebkd", EntropyWeights), ("ca_mkd", ConfidenceWeights), ("aekd", GradientMinNorm)):
        assert isinstance(make_weighter(name, 3), cls) and WEIGHTERS[name].fn is cls
    x, y = batch()
    teachers = [(mt.Clean(), mt.Teacher(tiny_net(seed=k))) for k in (1, 2, 3)]
    recipe = multi_teacher(tiny_net(seed=0), teachers, weighter="ca_mkd").train()
    out = recipe(x, y)
    with torch.no_grad():
        ce = torch.stack([ce_rows(t.model(x), y) for _, t in teachers])
    w = (1.0 - torch.softmax(ce, 0)) / 2
    assert out.weights.tolist() == pytest.approx(w.mean(1).tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="has no teacher logits"):
        EntropyWeights(2).weigh(StepContext(torch.rand(2, 4), y[:4], [None, None], [None, None]))


def test_any_number_of_teachers_through_the_list_functions():
    x, y = batch()
    four = [mt.Teacher(tiny_net(seed=k)) for k in (1, 2, 3, 4)]
    for fn in (avg_kd_teachers, ebkd_teachers, ca_mkd_teachers):
        recipe = fn(tiny_net(seed=0), four).train()
        out = recipe(x, y)
        assert len([n for n in recipe.branch_names if n.startswith("kd_")]) == 4 and torch.isfinite(out.total)
    assert ebkd_teachers(tiny_net(), four).weighter.scales[1] == pytest.approx(1 / 4)  # the code's / K
    for fn in (ebkd_teachers, ca_mkd_teachers):
        with pytest.raises(ValueError, match="at least 2 teachers"):
            fn(tiny_net(), four[:1])
    with pytest.raises(ValueError, match="needs a t3 teacher"):
        PRESETS["ebkd"].fn(tiny_net(), four[0], four[1])
    swapped = PRESETS["avg_kd"].fn(tiny_net(seed=0), *four[:3], weighter="ebkd").train()
    assert isinstance(swapped.weighter.parts[1], EntropyWeights)
