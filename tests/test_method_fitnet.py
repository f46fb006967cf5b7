"""FitNet (RepDistiller / Rorozhl/CA-MKD's FitNet-MKD): CE + T^2 KL at T = 4 + 100 x the hint MSE through the
regressor, re-done by hand in float64 on copies of the same nets and batch; default layers and regressors."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.methods.fitnet import HintRegressor, hint_layer
from multiteach.models import CifarResNet, WideResNet
from multiteach.presets import PRESETS
from tests.conftest import hinton_kd_rows, image_batch, tiny_net

T = 4.0


def batch(seed: int = 5, n: int = 8):
    return image_batch(seed, n)


def kd_rows(s, t):
    """Per-sample T^2 KL at T (DistillKL(is_ca=True)), float64."""
    return hinton_kd_rows(s, t, T)


def test_fitnet_is_ce_plus_kd_plus_100_hint_mse_through_the_regressor():
    student = tiny_net(seed=0)  # layer2: 16 x 16 x 16 at 32 px
    torch.manual_seed(1)
    teacher = CifarResNet((1, 1, 1), (8, 32, 64)).eval()  # layer2: 32 x 16 x 16
    recipe = PRESETS["fitnet"].fn(copy.deepcopy(student), mt.Teacher(copy.deepcopy(teacher))).train()
    hint = recipe.branches[2]
    assert (hint.student_layer, hint.teacher_layer) == ("layer2", "layer2")
    conv, bn = hint.loss.projector.conv, hint.loss.projector.bn
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)  # same size: a 1x1 ConvReg
    params = [p.detach().clone().requires_grad_(True) for p in (conv.weight, conv.bias, bn.weight, bn.bias)]
    x, y = batch()
    out = recipe(x, y)
    out.total.backward()

    feats = {}
    student.train().layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    teacher.layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    z = student(x)
    with torch.no_grad():
        t = teacher(x)
    r = F.relu(F.batch_norm(F.conv2d(feats["s"], params[0], params[1]), None, None, params[2], params[3],
                            training=True, eps=bn.eps))
    mse = (r.double() - feats["t"].double()).pow(2).flatten(1).mean(1)  # nn.MSELoss(): mean over every element
    ce = F.cross_entropy(z.double(), y, reduction="none")
    kd = kd_rows(z, t)
    want = ce.mean() + kd.mean() + 100 * mse.mean()
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    # rtol 5e-5: the library's float32 KL at T = 4 cancels to ~2e-5 relative error
    torch.testing.assert_close(out.losses, torch.stack([ce.mean(), kd.mean(), mse.mean()]).float(), rtol=5e-5,
                               atol=1e-7)
    assert out.weights.tolist() == [1.0, 1.0, 100.0]
    want.backward()  # the regressor trains with the student; the teacher gets no gradient
    for mine, hand in zip(recipe.student.parameters(), student.parameters()):
        torch.testing.assert_close(mine.grad, hand.grad, rtol=1e-4, atol=1e-6)
    for mine, hand in zip((conv.weight, conv.bias, bn.weight, bn.bias), params):
        torch.testing.assert_close(mine.grad, hand.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in recipe.teachers[0].parameters())
    extra = {id(p) for p in recipe.trainable_parameters()[1]}
    assert all(id(p) in extra for p in hint.loss.projector.parameters())
    assert PRESETS["fitnet"].teachers == ("nat",)


def test_the_regressor_maps_the_students_shape_onto_the_teachers():
    x = torch.randn(2, 16, 16, 16)
    for t_shape, kind in (((32, 8, 8), torch.nn.Conv2d), ((32, 32, 32), torch.nn.ConvTranspose2d),
                          ((32, 16, 16), torch.nn.Conv2d), ((32, 12, 12), torch.nn.Conv2d),
                          ((32, 64, 64), torch.nn.Conv2d)):
        reg = HintRegressor((16, 16, 16), t_shape)
        out = reg(x)
        assert tuple(out.shape[1:]) == t_shape and isinstance(reg.conv, kind) and (out >= 0).all()
    assert HintRegressor((16, 16, 16), (32, 8, 8)).conv.stride == (2, 2)
    assert HintRegressor((16, 16, 16), (32, 64, 64)).size == (64, 64)  # upsampled, then a 3x3 convolution


def test_default_layers_by_name_else_a_one_line_error_naming_the_option():
    assert hint_layer(tiny_net(), None, "student_layer") == "layer2"
    assert hint_layer(WideResNet(10, 1), None, "teacher_layer") == "block2"
    assert hint_layer(tiny_net(), "layer1", "student_layer") == "layer1"
    mobilenet = mt.teachers.create_model("cifar_mobilenetv2")
    with pytest.raises(ValueError, match=r"pass teacher_layer=\.\.\. \(its top-level layers: conv1, bn1, layers"):
        PRESETS["fitnet"].fn(tiny_net(), mt.Teacher(mobilenet))
    x, y = batch()
    recipe = PRESETS["fitnet"].fn(tiny_net(seed=0), mt.Teacher(mobilenet), teacher_layer="layers.10").train()
    out = recipe(x, y)  # MobileNetV2's 64-channel 8x8 map, from the student's 16x16 layer2 (3x3 stride 2)
    assert torch.isfinite(out.total) and isinstance(recipe.branches[2].loss.projector.conv, torch.nn.Conv2d)
    assert recipe.branches[2].loss.projector.conv.stride == (2, 2)
