import pytest
import timm
import torch

import multiteach as mt
import multiteach.models  # noqa: F401  (registers the CIFAR models in timm)


@pytest.mark.parametrize("name,params", [
    ("cifar_resnet18", 11_173_962), ("cifar_resnet56", 855_770), ("cifar_wrn34_10", 46_160_474),
    ("cifar_mobilenetv2", 2_296_922),
])
def test_cifar_models_are_in_timms_registry(name, params):
    model = timm.create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params  # the published sizes
    if params < 20e6:
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert timm.create_model(name, num_classes=100).num_classes == 100


def test_unknown_model_and_pretrained_are_explained():
    with pytest.raises(ValueError, match="unknown model"):
        mt.create_model("cifar_resnet1000")
    with pytest.raises(ValueError, match="unknown pretrained tag in 'resnet18.a9_in1k': resnet18.a1_in1k"):
        mt.create_model("resnet18.a9_in1k")  # refused by name, before timm builds it
    with pytest.raises(ValueError, match="no hosted weights"):
        timm.create_model("cifar_resnet18", pretrained=True)


def test_any_timm_model_can_be_a_teacher():
    t = mt.Teacher("resnet10t", num_classes=10)
    assert t(torch.rand(1, 3, 32, 32)).shape == (1, 10) and not t.training


def test_checkpoint_of_another_architecture_is_explained(tmp_path):
    mt.atomic_save({"model": timm.create_model("cifar_resnet8").state_dict()}, tmp_path / "r8.pt")
    with pytest.raises(mt.CheckpointError, match="another architecture"):
        mt.Teacher("cifar_resnet20", checkpoint=tmp_path / "r8.pt")
    t = mt.Teacher("cifar_resnet8", checkpoint=tmp_path / "r8.pt")
    assert t.num_classes == 10


def test_airbench_net_is_a_cifar_model_whose_bn_folding_skips_the_pooled_convs():
    """cifar_airbench pools between a conv and its BatchNorm: folding that BN into the conv would be wrong
    wherever a BN scale is negative (max-pool does not commute with it), so only the conv -> BN pairs fold and
    the folded teacher / attack view computes what the model does."""
    from multiteach.fast import fold_batchnorm, folded_eval

    torch.manual_seed(0)
    model = timm.create_model("cifar_airbench", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 1_972_816
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert timm.create_model("cifar_airbench", num_classes=100).num_classes == 100
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None  # running statistics of real activations, so the logits depend on the input
        model(torch.rand(64, 3, 32, 32))
        for bn in bns:  # negative scales: a fold across a max-pool would change the output
            bn.weight.uniform_(-1, 1)
            bn.bias.uniform_(-0.2, 0.2)
        model.eval()
        x = torch.rand(8, 3, 32, 32)
        want = model(x)
        view = folded_eval(model)
        assert len(view.pairs) == 4  # the stem and each group's second conv; not the convs before a max-pool
        for folded in (fold_batchnorm(model), view):
            assert torch.allclose(folded(x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
