import copy

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


def airbench_whitening(x: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """airbench94's own procedure, written out independently (float64): standardize each channel, take the 2x2
    patches as its get_patches does (unfold, transpose, reshape), eigendecompose their uncentered covariance,
    and convolve the standardized images with the eigenvectors / sqrt(eigenvalue + eps), largest first."""
    x = x.double()
    mean, std = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), x.std(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    z = (x - mean) / std
    patches = z.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2)
    flat = patches.reshape(len(patches), -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    filters = eigenvectors.T.reshape(12, 3, 2, 2).flip(0) / (eigenvalues.flip(0) + eps).sqrt().view(-1, 1, 1, 1)
    return torch.nn.functional.conv2d(z, filters)


def test_airbench94_whitening_stem_is_airbenchs_and_the_rest_starts_as_airbench_does():
    """cifar_airbench94's stem, fitted by init_from_data on raw images, computes airbench's whitening of the
    standardized images (each filter up to its sign, then its negation), with its bias at 0 (the standardization
    sits in a fixed offset, so weight decay pulls the trained bias to airbench's 0, not to a shifted stem); it
    refuses to train unfitted. Each group's second conv starts as the identity; the BN scales are frozen and only
    the BN biases get the 64x LR. The folded eval view still computes the model."""
    from multiteach.data import Images
    from multiteach.fast import _fast_copy, fold_batchnorm, folded_eval

    torch.manual_seed(0)
    model = timm.create_model("cifar_airbench94", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 1_972_792
    with pytest.raises(RuntimeError, match="not fitted to data: call model.init_from_data"):
        model(torch.rand(2, 3, 32, 32))
    # smooth images (neighbouring pixels correlated, colours of unequal scale), as uint8 like a training split
    x = torch.nn.functional.interpolate(torch.rand(200, 3, 8, 8), size=32, mode="bilinear")
    x = (x ** 2 * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1) * 255).round().to(torch.uint8)
    images = Images(x.permute(0, 2, 3, 1).numpy())
    model.init_from_data(images)
    stem = model.stem[0]
    assert not stem.weight.requires_grad and stem.bias.requires_grad and torch.all(stem.bias == 0)
    raw = images.to("cpu")
    with torch.no_grad():
        ours, want = stem(raw).double(), airbench_whitening(raw)
    for k in range(12):  # an eigenvector's sign is arbitrary; its magnitude and the negated copy are not
        sign = torch.sign((ours[:, k] * want[:, k]).sum())
        assert torch.allclose(ours[:, k], sign * want[:, k], atol=1e-3 * want[:, k].abs().max().item())
        assert torch.allclose(ours[:, 12 + k], -ours[:, k], atol=1e-5)
    model(raw[:4])  # fitted: it trains
    trained = copy.deepcopy(model)
    trained.load_state_dict(timm.create_model("cifar_airbench94").state_dict())  # an unfitted stem's weights
    with pytest.raises(RuntimeError, match="not fitted"):
        trained(raw[:4])
    conv2 = model.groups[0][4]
    h = torch.randn(2, conv2.in_channels, 8, 8)
    assert torch.allclose(conv2(h), h, atol=1e-6)  # dirac: identity at the start
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not bn.weight.requires_grad and bn.momentum == 0.4 for bn in bns)
    scales = model.param_lr_scales()
    named = dict(model.named_parameters())
    assert set(scales) == {n for n, p in named.items() if n.endswith(".bias") and n.startswith("groups.")}
    assert set(scales.values()) == {64.0} and len(scales) == len(bns)
    model.eval()
    with torch.no_grad():
        want = model(raw[:8])
        assert torch.allclose(folded_eval(model)(raw[:8]), want, atol=1e-5)
        assert torch.allclose(fold_batchnorm(model)(raw[:8]), want, atol=1e-5)
        fast = _fast_copy(model, torch.bfloat16)  # the fast path's teacher copy (CUDA only there), in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (fast(raw[:8]).float().argmax(1) == want.argmax(1)).float().mean() >= 0.75


def test_natural_recipe_is_airbench94s_own_and_scales_its_lr_with_a_smaller_batch():
    from multiteach.models import natural_recipe

    assert natural_recipe("cifar_resnet18") is None
    own = natural_recipe("cifar_airbench94")
    # 11.5 per 1024 examples on a summed loss with Nesterov 0.85: 11.5 / (1 + 1 / 0.15) = 1.5 on a mean loss
    assert own["train"]["batch_size"] == 1024 and own["train"]["lr"] == pytest.approx(1.5)
    assert own["train"]["weight_decay"] == pytest.approx(0.0153 / 11.5) and own["options"] == {"label_smoothing": 0.2}
    small = natural_recipe("cifar_airbench94", max_batch=256)
    assert small["train"]["batch_size"] == 256 and small["train"]["lr"] == pytest.approx(0.375)
    assert natural_recipe("cifar_airbench94", max_batch=4096)["train"]["batch_size"] == 1024
    ddp = natural_recipe("cifar_airbench94", world=8)["train"]  # a global batch of 1,024: 128 a process
    assert ddp["batch_size"] == 128 and ddp["lr"] == pytest.approx(1.5)
    assert natural_recipe("cifar_airbench94", max_batch=64, world=8)["train"]["lr"] == pytest.approx(0.75)
    mt.TrainConfig(**own["train"])  # valid settings
