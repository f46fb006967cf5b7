"""The README's "Extending" section runs as written: a weighter, an attack, a dataset and a preset, each
registered by name and then used by name, the way a config would use it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import multiteach as mt
from multiteach.build import build_recipe, load_splits
from multiteach.config import DataConfig, ExperimentConfig
from multiteach.evaluation import attacks_by_name
from multiteach.registry import ATTACKS, DATASETS, PRESETS, WEIGHTERS
from tests.conftest import tiny_net

README = Path(__file__).resolve().parents[1] / "README.md"
NEW = [(WEIGHTERS, "confidence"), (ATTACKS, "noise"), (DATASETS, "stripes"), (PRESETS, "mtard_ce")]


def section_blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Extending\n(.*?)(?=^## )", text, flags=re.S | re.M).group(1)
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


@pytest.fixture(scope="module")
def registered():
    """Run the four blocks as one module (a user's plugin file); take its entries out of the registries after."""
    import sys
    import types

    module = types.ModuleType("readme_plugins")
    sys.modules[module.__name__] = module
    try:
        for block in section_blocks():
            exec(compile(block, str(README), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]
        for registry, name in NEW:
            registry._entries.pop(name, None)


def test_the_section_has_the_four_blocks():
    assert len(section_blocks()) == 4


def test_the_weighter_is_used_by_name_with_its_options(registered):
    recipe = mt.presets.mtard(tiny_net(seed=0), mt.Teacher(tiny_net(seed=1)), mt.Teacher(tiny_net(seed=2)),
                              weighter={"name": "confidence", "sharpness": 2.0}, steps=1).train()
    assert type(recipe.weighter).__name__ == "Confidence" and recipe.weighter.sharpness == 2.0
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = recipe(x, y)
    w = recipe.weighter.weigh(_ctx(recipe, x, y))
    assert w.shape == (2, 8) and torch.allclose(w.sum(0), torch.full((8,), 2.0))  # per sample, summing to N
    assert out.weights.shape == (2,) and torch.isfinite(out.total)


def _ctx(recipe, x, y):
    from multiteach.weighting import StepContext

    with torch.no_grad():
        targets = [b.teacher(x) for b in recipe.branches]
    return StepContext(torch.zeros(2, len(y)), y, [None, None], targets)


def test_the_attack_is_a_table_row_by_name(registered):
    net = tiny_net().eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    (noise,) = attacks_by_name(["noise"], eps=4 / 255).values()
    x_adv = noise(net, x, y)
    assert noise.eps == 4 / 255 and (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and 0 <= x_adv.min()


def test_the_dataset_is_read_by_the_config(registered):
    splits = load_splits(DataConfig(dataset="stripes", val_size=40))
    assert splits.num_classes == 4 and len(splits.val) == 40 and len(splits.train) == 1960


def test_the_preset_is_built_from_a_config(registered, tmp_path):
    ckpt = tmp_path / "t.pt"
    torch.save(mt.create_model("cifar_resnet8").state_dict(), ckpt)
    cfg = ExperimentConfig(preset="mtard_ce", student={"model": "cifar_resnet8"}, options={"steps": 1},
                           teachers={r: {"model": "cifar_resnet8", "checkpoint": str(ckpt)} for r in ("adv", "nat")})
    assert cfg.train.epochs == 300  # the registered schedule
    recipe = build_recipe(cfg, 10).train()
    assert recipe.branch_names == ["adv", "nat", "ce"] and type(recipe.weighter).__name__ == "ANL"
    out = recipe(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert out.losses.shape == (3,) and torch.isfinite(out.total)
    # the two snippets together: the weighter over a branch without a teacher (the CE on labels)
    mixed = build_recipe(cfg.model_copy(update={"options": {"steps": 1, "weighter": {"name": "confidence"}}}),
                         10).train()
    assert torch.isfinite(mixed(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))).total)
