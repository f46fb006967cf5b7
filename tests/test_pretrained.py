"""Pretrained teachers and their preprocessing, on the CPU and offline: normalisation and input size live in
the model's wrapper (attacks stay in [0, 1] pixel space), a size mismatch is refused unless resizing was
asked for, and timm (a local file), torchvision (a file in its cache) and RobustBench (a file where it looks)
load weights without any download; a config names all three."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import multiteach as mt
from multiteach.build import build_model, build_recipe
from multiteach.config import ExperimentConfig, ModelConfig
from multiteach.fast import FastTeacher, fold_batchnorm, plan
from multiteach.features import capture
from multiteach.preprocess import Preprocessed, with_preprocessing
from multiteach.pretrained import (
    ROBUSTBENCH_INSTALL,
    _robustbench,
    robustbench_file,
    torchvision_cache_file,
    torchvision_model,
)
from multiteach.recipe import Branch, Recipe
from multiteach.teachers import load_into
from tests.conftest import tiny_net

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Any download fails the test (torch hub's and timm's URL and Hugging Face Hub fetches); torch hub's cache
    is a fresh folder."""
    import timm.models._hub
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)


def images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def inputs_of(module):
    """The inputs ``module`` receives, recorded by a forward pre-hook."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


# ------------------------------------------------------------------------------ preprocessing in the wrapper
def test_the_network_sees_normalised_inputs_and_the_attack_pixel_space():
    teacher = mt.Teacher(tiny_net(seed=0), mean=MEAN, std=STD, name="norm")
    student = with_preprocessing(tiny_net(seed=1), MEAN, STD)
    x, y = images()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for model, net in ((teacher, teacher.model.net), (student, student.net)):
        x_adv = mt.PGD(eps=8 / 255, alpha=2 / 255, steps=3)(model, x, y)
        assert x_adv.min() >= 0 and x_adv.max() <= 1  # the attack stays in [0, 1] ...
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6  # ... and eps is in pixel units
        seen = inputs_of(net)
        model.eval()(x_adv)
        assert torch.allclose(seen[-1], (x_adv - mean) / std, atol=1e-6)  # the network gets (x - mean) / std
    # layers answer to the bare network's names (feature branches), and class counts are the network's
    with capture(teacher.model, ["layer1"]) as feats:
        teacher(x)
    assert feats["layer1"].shape[0] == 4 and teacher.num_classes == 10 and student.num_classes == 10
    # the recipe calls it the same way: the teacher's network receives the normalised PGD input
    seen = inputs_of(teacher.model.net)
    recipe = Recipe(student, [Branch(mt.PGD(steps=1), mt.KLDistill(), teacher=teacher)])
    recipe(x, y).total.backward()
    assert seen and seen[-1].min() < -0.5  # normalised, not [0, 1]


def test_a_size_mismatch_is_refused_in_one_line_naming_both_sizes():
    teacher = mt.Teacher(tiny_net(), mean=MEAN, std=STD, input_size=224, name="imagenet")
    x, _ = images()
    with pytest.raises(ValueError) as e:
        teacher(x)
    msg = str(e.value)
    assert "\n" not in msg and "224x224" in msg and "32x32" in msg and "teacher 'imagenet'" in msg
    assert "resize=True" in msg
    with pytest.raises(ValueError, match="224x224 images but the data is 32x32"):
        teacher.preprocess.check(32)  # the same refusal at build time, when the data's size is known
    with pytest.raises(ValueError, match="needs the size"):
        mt.Teacher(tiny_net(), resize=True)


def test_resize_when_asked():
    net = tiny_net(seed=0).eval()
    teacher = mt.Teacher(net, input_size=(48, 40), resize=True)
    seen = inputs_of(net)
    x, _ = images()
    out = teacher(x)
    assert seen[-1].shape[-2:] == (48, 40)
    expected = net(F.interpolate(x, size=(48, 40), mode="bilinear", antialias=True, align_corners=False))
    assert torch.allclose(out, expected, atol=1e-6)
    teacher.preprocess.check(32)  # resizing: any data size is accepted


def test_the_fast_path_folds_the_preprocessing_with_the_network():
    teacher = mt.Teacher(tiny_net(seed=0), mean=MEAN, std=STD, input_size=32, name="t")
    x, y = images()
    folded = fold_batchnorm(teacher.model)
    assert torch.allclose(folded(x), teacher(x), atol=1e-5)  # the normalisation is part of the folded copy
    with pytest.raises(ValueError, match="32x32 images but the data is 40x40"):
        folded(torch.rand(1, 3, 40, 40))  # and so is the size check
    recipe = Recipe(tiny_net(), [Branch(mt.Clean(), mt.KLDistill(), teacher=teacher)])
    teachers, _, eager = plan(recipe)
    assert teachers == [teacher] and not eager  # a normalising teacher is folded like any other
    fast = FastTeacher(teacher, None, graphs=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(fast(x).float(), teacher(x).float(), atol=0.1)
    assert torch.equal(fast(x), teacher(x))  # fp32: the exact model


def test_checkpoints_load_into_the_bare_network_or_the_wrapper(tmp_path):
    bare, wrapped = tiny_net(seed=0), with_preprocessing(tiny_net(seed=1), MEAN, STD)
    torch.save(bare.state_dict(), tmp_path / "bare.pt")
    load_into(wrapped, tmp_path / "bare.pt")
    assert torch.equal(wrapped.net.linear.weight, bare.linear.weight)
    other = with_preprocessing(tiny_net(seed=2), MEAN, STD)
    torch.save(other.state_dict(), tmp_path / "wrapped.pt")  # a student trained behind its preprocessing
    load_into(wrapped, tmp_path / "wrapped.pt")
    assert torch.equal(wrapped.net.linear.weight, other.net.linear.weight)


# -------------------------------------------------------------------------------------------------- timm
def write_timm_weights(path, seed=0):
    torch.manual_seed(seed)
    net = timm.create_model("test_resnet")  # timm's tiny test model (0.5M parameters, 1000 classes)
    torch.save(net.state_dict(), path)
    return net


def test_timm_pretrained_weights_from_a_local_file(tmp_path):
    ref = write_timm_weights(tmp_path / "w.pth")
    t = mt.Teacher("test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    sd = t.model.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())  # the file's weights
    assert t.num_classes == 1000 and t.name == "test_resnet"
    pre = t.preprocess  # from the model's pretrained_cfg
    assert pre.mean.flatten().tolist() == [0.5] * 3 and pre.std.flatten().tolist() == [0.5] * 3
    assert pre.input_size == (160, 160) and not pre.resize
    x, _ = images(2)
    with pytest.raises(ValueError, match="160x160 images but the data is 32x32"):
        t(x)
    resized = mt.Teacher("test_resnet", pretrained=True, resize=True,
                         pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    assert resized(x).shape == (2, 1000)
    with pytest.raises(ValueError, match="1000 classes, not 10: a frozen teacher would get an untrained head"):
        mt.Teacher("test_resnet", pretrained=True, num_classes=10,
                   pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    # without pretrained weights a timm model takes [0, 1] inputs as they are (as the CIFAR models do)
    assert mt.Teacher("cifar_resnet8").preprocess is None
    # weights that cannot be fetched (offline, no cache): one line naming the model and the file option
    with pytest.raises(FileNotFoundError, match=r"pretrained weights of 'test_resnet' could not be read "
                                                r"\(FileNotFoundError: .*weights = 'path/to/model.safetensors'"):
        mt.Teacher("test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "absent.pth")))


# ------------------------------------------------------------------------------------------- torchvision
def test_torchvision_weights_from_its_cache_without_download(tmp_path):
    import torchvision

    path = torchvision_cache_file("shufflenet_v2_x0_5", "IMAGENET1K_V1")
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"  # $TORCH_HOME/hub/checkpoints
    assert path.name == "shufflenetv2_x0.5-f707e7126e.pth"  # the file name in the weights' URL
    torch.manual_seed(0)
    ref = torchvision.models.shufflenet_v2_x0_5()
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    t = mt.Teacher.from_torchvision("shufflenet_v2_x0_5", weights="IMAGENET1K_V1", resize=True)
    sd = t.model.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    assert t.num_classes == 1000 and t.name == "shufflenet_v2_x0_5"
    assert torch.allclose(t.preprocess.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(t.preprocess.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert t.preprocess.input_size == (224, 224)
    assert t(images(1)[0]).shape == (1, 1000)
    with pytest.raises(ValueError, match="has no weights 'IMAGENET1K_V9': choose one of IMAGENET1K_V1, DEFAULT"):
        mt.Teacher.from_torchvision("shufflenet_v2_x0_5", weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet1'"):
        mt.Teacher.from_torchvision("resnet1")
    with pytest.raises(ValueError, match="have 1000 classes, not 10"):
        torchvision_model("shufflenet_v2_x0_5", "IMAGENET1K_V1", num_classes=10)
    untrained = torchvision_model("shufflenet_v2_x0_5", weights=None, num_classes=10)  # no weights: no preprocessing
    assert not isinstance(untrained, Preprocessed) and untrained.num_classes == 10


# ------------------------------------------------------------------------------------------- RobustBench
def test_robustbench_missing_is_one_line_with_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(ImportError) as e:
        mt.Teacher.from_robustbench("Carmon2019Unlabeled")
    assert "\n" not in str(e.value) and "pip install --no-deps robustbench" in str(e.value)


def test_robustbench_weights_from_a_preplaced_file(tmp_path, monkeypatch):

    from multiteach.pretrained import robustbench_installed

    if not robustbench_installed():  # torchattacks' bundled copy of the module does not count
        pytest.skip(f"robustbench is optional and not installed: {ROBUSTBENCH_INSTALL}")
    _, zoo = _robustbench()  # imported as the loader imports it
    import robustbench.utils
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", lambda *a: pytest.fail("a download was attempted"))
    torch.manual_seed(0)
    name = "Ding2020MMA"  # a WRN-28-4 (5.9M parameters): the smallest single CIFAR-10 Linf model of the zoo
    ref = zoo[BenchmarkDataset("cifar10")][ThreatModel("Linf")][name]["model"]()
    path = robustbench_file(name, "cifar10", "Linf", tmp_path / "rb")
    assert path == tmp_path / "rb" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    t = mt.Teacher.from_robustbench(name, "cifar10", "Linf", model_dir=tmp_path / "rb")
    sd = t.model.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    assert t.num_classes == 10 and t.preprocess.mean is None and t.preprocess.input_size == (32, 32)
    x, _ = images(2)
    assert t(x).shape == (2, 10)
    with pytest.raises(ValueError, match="no cifar10 Linf model 'Ding2020MM'"):
        mt.Teacher.from_robustbench("Ding2020MM")
    # from a config: weights = "MODEL_DIR/DATASET/THREAT_MODEL"
    cfg = ExperimentConfig(preset="rslad", student={"model": "cifar_resnet8"}, options={"steps": 1},
                           teachers={"adv": {"model": name, "source": "robustbench",
                                             "weights": str(tmp_path / "rb" / "cifar10" / "Linf")}})
    recipe = build_recipe(cfg, 10, image_size=32)
    assert torch.equal(recipe.teachers[0].model.net.fc.weight, ref.fc.weight)


# ------------------------------------------------------------------------------------------------ config
def test_a_config_names_pretrained_teachers(tmp_path):
    import torchvision

    write_timm_weights(tmp_path / "timm.pth")
    tv = torchvision_cache_file("shufflenet_v2_x0_5", "IMAGENET1K_V1")
    tv.parent.mkdir(parents=True)
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), tv)
    teachers = {"adv": {"model": "test_resnet", "weights": str(tmp_path / "timm.pth"), "resize": True},
                "nat": {"model": "shufflenet_v2_x0_5", "source": "torchvision", "weights": "IMAGENET1K_V1",
                        "resize": True}}
    cfg = ExperimentConfig(preset="mtard", student={"model": "cifar_resnet8"}, options={"steps": 1},
                           teachers=teachers)
    recipe = build_recipe(cfg, 1000, image_size=32).train()
    adv, nat = recipe.teachers
    assert adv.preprocess.input_size == (160, 160) and nat.preprocess.input_size == (224, 224)
    assert not isinstance(recipe.student, Preprocessed)  # the CIFAR student takes [0, 1] images as today
    seen = inputs_of(nat.model.net)
    x, y = images(2)
    out = recipe(x, y)
    assert torch.isfinite(out.total) and seen[-1].shape[-2:] == (224, 224)
    # without resize, the data's size is refused when the recipe is built, naming both sizes
    cfg.teachers["nat"] = ModelConfig(model="shufflenet_v2_x0_5", source="torchvision", pretrained=True)
    with pytest.raises(ValueError, match="teacher 'nat' takes 224x224 images but the data is 32x32"):
        build_recipe(cfg, 1000, image_size=32)
    # a pretrained student with its trained checkpoint (evaluation): the weights' normalisation, no download
    ref = with_preprocessing(timm.create_model("test_resnet", num_classes=10), MEAN, STD)
    torch.save(ref.state_dict(), tmp_path / "student.pt")
    student = build_model(ModelConfig(model="test_resnet", pretrained=True, resize=True,
                                      checkpoint=str(tmp_path / "student.pt")), 10)
    assert student.preprocess.input_size == (160, 160) and student.preprocess.mean.flatten().tolist() == [0.5] * 3
    assert torch.equal(student.net.fc.weight, ref.net.fc.weight)
    # a pretrained teacher whose head would be replaced (the data's classes differ) is refused
    with pytest.raises(ValueError, match="teacher 'adv' 'test_resnet': its pretrained weights have 1000 classes "
                                         "but the data has 10"):
        build_recipe(cfg, 10)


def test_config_fields_are_checked_and_defaults_not_written(tmp_path):
    assert ModelConfig(model="cifar_resnet8").model_dump() == {"model": "cifar_resnet8", "checkpoint": None}
    assert ModelConfig(model="resnet50", pretrained=True).model_dump()["pretrained"] is True
    with pytest.raises(ValueError, match="weights 'nope.pth' not found"):
        ModelConfig(model="resnet50", weights="nope.pth")
    with pytest.raises(ValueError, match="needs weights = '\\[MODEL_DIR/\\]DATASET/THREAT_MODEL'"):
        ModelConfig(model="Carmon2019Unlabeled", source="robustbench")
    with pytest.raises(ValueError, match="Input should be 'timm', 'torchvision' or 'robustbench'"):
        ModelConfig(model="x", source="hub")
