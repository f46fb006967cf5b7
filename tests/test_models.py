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
