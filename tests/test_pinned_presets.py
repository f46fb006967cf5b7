"""Pinned numbers of every preset on a fixed batch and seed: a refactor must leave them where they are.

Every entry of ``multiteach.presets.PRESETS`` (and the mtard weighter variants in ``VARIANTS``) is built with
tiny CPU nets (``tiny_net(seed=0)`` as the student, ``tiny_net(seed=1, 2, 3)`` as its teachers, wrapped in
``mt.Teacher``) and the preset's default options, in float64, and run on ``synthetic(16, size=16, seed=0)``
(inputs in [0, 1], NCHW) with ``torch.manual_seed(1000 + step)`` right before each ``recipe(x, y)``. Each step
records the total loss, the per-branch losses, the weights, the L2 norm of the student's gradient after
``out.total.backward()`` and, with a temperature balance (bmtard), the temperatures after the step. A recipe
whose state moves from step to step (a weighter other than ``Fixed``: ANL, DWA, uncertainty, random; or a
balance) runs 3 steps with plain SGD (lr 0.1) between them, the others one; every step ends an epoch
(``recipe.on_epoch_end()``), so DWA's weights move by the third step. The values are compared with
``pytest.approx(rel=1e-6, abs=1e-9)``.

Precision: the nets, the inputs, the attacks' iterates and the student's gradients are float64, but the library
computes every loss in float32 (``kl_divergence``, ``CrossEntropy`` and PGD's objective cast the logits with
``.float()``, ``Recipe`` casts each branch loss to float32, the weighters and ``EntropyBalance`` keep float32
buffers), so the pinned losses, weights and temperatures are float32 numbers and the gradient starts from a
float32 loss gradient. ARD's KL at T = 30 cancels in float32 to about 1e-4 relative error (see
tests/test_presets.py): a refactor that reorders that float32 arithmetic may move it beyond rel=1e-6.

A new preset fails here until its numbers are pinned. To (re)generate them, only for a new preset or a change
of the numbers that is intended (say why in the commit), run from the repository root

    python tests/test_pinned_presets.py --regenerate

and paste the printed ``PINNED = {...}`` over the one at the end of this file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import multiteach as mt
from multiteach.data import synthetic
from multiteach.presets import PRESETS
from multiteach.weighting import Fixed

try:
    from tests.conftest import tiny_net
except ModuleNotFoundError:  # run as a script: python tests/test_pinned_presets.py --regenerate
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import tiny_net

SEED = 1000
STATEFUL_STEPS = 3
LR = 0.1
REL, ABS = 1e-6, 1e-9
REGENERATE = "python tests/test_pinned_presets.py --regenerate"

# preset options beyond the defaults: the weighters mtard can swap ANL for (``fixed`` is baseline_mt)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mtard[weighter=dwa]": ("mtard", {"weighter": "dwa"}),
    "mtard[weighter=uw]": ("mtard", {"weighter": "uw"}),
    "mtard[weighter=rlw]": ("mtard", {"weighter": "rlw"}),
}


def cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """Case name -> (preset, options): every registered preset with its defaults, then ``VARIANTS``."""
    return {**{name: (name, {}) for name in PRESETS}, **VARIANTS}


def build(case: str) -> mt.Recipe:
    preset, options = cases()[case]
    info = PRESETS[preset]
    student = tiny_net(seed=0).double()
    teachers = [mt.Teacher(tiny_net(seed=1 + k).double()) for k in range(len(info.teachers))]
    return info.fn(student, *teachers, **options).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = synthetic(16, size=16, seed=0)
    x = torch.from_numpy(data.x).permute(0, 3, 1, 2).contiguous().double() / 255  # NCHW memory, in [0, 1]
    return x, torch.from_numpy(data.y)


def is_stateful(recipe: mt.Recipe) -> bool:
    return not isinstance(recipe.weighter, Fixed) or recipe.balance is not None


def run(case: str, steps: int | None = None) -> list[dict[str, Any]]:
    """The recorded numbers of ``steps`` steps (default: 3 for a recipe with evolving state, else 1)."""
    recipe = build(case)
    steps = steps if steps is not None else (STATEFUL_STEPS if is_stateful(recipe) else 1)
    x, y = batch()
    opt = torch.optim.SGD([p for p in recipe.parameters() if p.requires_grad], lr=LR)
    record = []
    for step in range(steps):
        torch.manual_seed(SEED + step)
        out = recipe(x, y)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        grads = [p.grad for p in recipe.student.parameters()]
        assert all(g is not None for g in grads), f"{case}: a student parameter got no gradient"
        entry = {
            "total": out.total.item(),
            "losses": out.losses.tolist(),
            "weights": out.weights.tolist(),
            "grad_norm": torch.cat([g.flatten() for g in grads]).norm().item(),
        }
        if recipe.balance is not None:
            entry["temperatures"] = recipe.balance.temperatures.tolist()
        record.append(entry)
        opt.step()
        recipe.on_epoch_end()
    return record


def _values(entry: dict[str, Any]) -> list[float]:
    return [v for value in entry.values() for v in (value if isinstance(value, list) else [value])]


@pytest.fixture(scope="module", autouse=True)
def _deterministic_threads():
    """One intra-op thread: the CPU kernels' reduction order must not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(cases()))
def test_preset_matches_its_pinned_numbers(case):
    if case not in PINNED:
        pytest.fail(f"no pinned numbers for {case!r}: run `{REGENERATE}` and paste its PINNED over this file's "
                    "(only for a new preset or an intended change of the numbers)")
    want = PINNED[case]
    got = run(case, len(want))
    for step, (g, w) in enumerate(zip(got, want), 1):
        where = f"{case}, step {step}"
        assert all(math.isfinite(v) for v in _values(g)), f"{where}: non-finite values {g}"
        assert g.keys() == w.keys(), f"{where}: recorded {sorted(g)}, pinned {sorted(w)}"
        assert len(g["losses"]) == len(g["weights"]), f"{where}: {len(g['losses'])} losses, {len(g['weights'])} weights"
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=REL, abs=ABS), f"{where}: {key} moved"


def test_pinned_numbers_are_complete_and_finite():
    stale = sorted(set(PINNED) - set(cases()))
    assert not stale, f"pinned numbers for cases that no longer exist: {stale}; run `{REGENERATE}`"
    for case, steps in PINNED.items():
        assert len(steps) in (1, STATEFUL_STEPS), case
        for entry in steps:
            assert {"total", "losses", "weights", "grad_norm"} <= entry.keys(), case
            assert all(math.isfinite(v) for v in _values(entry)), case
    for case in ("mtard", "bmtard", "baseline_mt_anl", "mtard3", "mtard[weighter=dwa]"):
        assert len(PINNED[case]) == STATEFUL_STEPS, f"{case} has evolving state: pin {STATEFUL_STEPS} steps"
    assert len(PINNED["natural"]) == 1
    assert all("temperatures" in entry for entry in PINNED["bmtard"])


def test_mtard3_pins_all_three_branch_losses():
    for entry in PINNED["mtard3"]:
        assert len(entry["losses"]) == 3 and len(entry["weights"]) == 3
        assert all(loss > 0 for loss in entry["losses"]) and len(set(entry["losses"])) == 3
    assert PINNED["mtard3"][-1]["weights"] != PINNED["mtard3"][0]["weights"]  # ANL moved them


def format_pinned(pinned: dict[str, list[dict[str, Any]]]) -> str:
    """``PINNED = {...}`` as Python source within 120 columns, floats in repr precision."""
    lines = ["PINNED: dict[str, list[dict[str, Any]]] = {"]
    for case, steps in pinned.items():
        lines.append(f'    "{case}": [')
        for entry in steps:
            lines.append("        {")
            lines += [f'            "{key}": {value!r},' for key, value in entry.items()]
            lines.append("        },")
        lines.append("    ],")
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true", help="print the PINNED literal from a fresh run")
    args = parser.parse_args(argv)
    if not args.regenerate:
        parser.error("nothing to do: pass --regenerate (the tests run under pytest)")
    torch.set_num_threads(1)
    print(format_pinned({case: run(case) for case in cases()}))


# generated by `python tests/test_pinned_presets.py --regenerate`
PINNED: dict[str, list[dict[str, Any]]] = {
    "natural": [
        {
            "total": 2.1986587047576904,
            "losses": [2.1986587047576904],
            "weights": [1.0],
            "grad_norm": 2.4332315564330487,
        },
    ],
    "sat": [
        {
            "total": 2.241759777069092,
            "losses": [2.241759777069092],
            "weights": [1.0],
            "grad_norm": 2.2809785006424743,
        },
    ],
    "trades": [
        {
            "total": 2.205673933029175,
            "losses": [2.1986587047576904, 0.0011692098341882229],
            "weights": [1.0, 6.0],
            "grad_norm": 2.4350418962940314,
        },
    ],
    "ard": [
        {
            "total": 0.008309708908200264,
            "losses": [0.008309708908200264],
            "weights": [1.0],
            "grad_norm": 0.041834708470968686,
        },
    ],
    "rslad": [
        {
            "total": 0.008602268993854523,
            "losses": [0.00858982466161251, 0.008664493449032307],
            "weights": [0.8333333134651184, 0.1666666716337204],
            "grad_norm": 0.051014536690925205,
        },
    ],
    "mtard": [
        {
            "total": 0.008625542744994164,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05067793790101372,
        },
        {
            "total": 0.008220750838518143,
            "losses": [0.008269837126135826, 0.008171705529093742],
            "weights": [0.4997861981391907, 0.5002138018608093],
            "grad_norm": 0.04835746697628306,
        },
        {
            "total": 0.007971832528710365,
            "losses": [0.00800668727606535, 0.007937038317322731],
            "weights": [0.4995577335357666, 0.5004422664642334],
            "grad_norm": 0.04695428626557493,
        },
    ],
    "bmtard": [
        {
            "total": 0.008625542744994164,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05067793790101372,
            "temperatures": [1.0010000467300415, 1.0],
        },
        {
            "total": 0.008219688199460506,
            "losses": [0.008267712779343128, 0.008171705529093742],
            "weights": [0.49978458881378174, 0.5002154111862183],
            "grad_norm": 0.048356792413696684,
            "temperatures": [1.002000093460083, 1.0],
        },
        {
            "total": 0.00796972494572401,
            "losses": [0.00800247211009264, 0.007937034592032433],
            "weights": [0.4995529055595398, 0.500447154045105],
            "grad_norm": 0.04695302269486935,
            "temperatures": [1.0030001401901245, 1.0],
        },
    ],
    "baseline": [
        {
            "total": 0.008824544958770275,
            "losses": [0.008824544958770275],
            "weights": [1.0],
            "grad_norm": 0.051103772587269475,
        },
    ],
    "baseline_mt": [
        {
            "total": 0.008625542744994164,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05067793790101372,
        },
    ],
    "baseline_mt_anl": [
        {
            "total": 0.008625542744994164,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05067793790101372,
        },
        {
            "total": 0.008220750838518143,
            "losses": [0.008269837126135826, 0.008171705529093742],
            "weights": [0.4997861981391907, 0.5002138018608093],
            "grad_norm": 0.04835746697628306,
        },
        {
            "total": 0.007971832528710365,
            "losses": [0.00800668727606535, 0.007937038317322731],
            "weights": [0.4995577335357666, 0.5004422664642334],
            "grad_norm": 0.04695428626557493,
        },
    ],
    "mtard3": [
        {
            "total": 0.008342341519892216,
            "losses": [0.008824544958770275, 0.008426539599895477, 0.007775938604027033],
            "weights": [0.3333333432674408, 0.3333333432674408, 0.3333333432674408],
            "grad_norm": 0.05000614783800581,
        },
        {
            "total": 0.007928409613668919,
            "losses": [0.008249824866652489, 0.008177081122994423, 0.007358260452747345],
            "weights": [0.3331961929798126, 0.33350762724876404, 0.3332962393760681],
            "grad_norm": 0.04767193941333103,
        },
        {
            "total": 0.007699757814407349,
            "losses": [0.008021021261811256, 0.007947543635964394, 0.007130542304366827],
            "weights": [0.3330724239349365, 0.3336849510669708, 0.3332427144050598],
            "grad_norm": 0.0459506947564692,
        },
    ],
    "mtard[weighter=dwa]": [
        {
            "total": 0.017251085489988327,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [1.0, 1.0],
            "grad_norm": 0.10135587580202744,
        },
        {
            "total": 0.01596815325319767,
            "losses": [0.008042043074965477, 0.007926110178232193],
            "weights": [1.0, 1.0],
            "grad_norm": 0.0940070504854065,
        },
        {
            "total": 0.015066074207425117,
            "losses": [0.007573028560727835, 0.00749362725764513],
            "weights": [0.9926785826683044, 1.0073213577270508],
            "grad_norm": 0.08824697706160811,
        },
    ],
    "mtard[weighter=uw]": [
        {
            "total": 0.008625542744994164,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05067793790101372,
        },
        {
            "total": -0.040930189192295074,
            "losses": [0.008269837126135826, 0.008171705529093742],
            "weights": [0.5254036784172058, 0.5254141092300415],
            "grad_norm": 0.05081447239333342,
        },
        {
            "total": -0.0903470367193222,
            "losses": [0.007995035499334335, 0.007925311103463173],
            "weights": [0.552101731300354, 0.5521155595779419],
            "grad_norm": 0.05175289164624624,
        },
    ],
    "mtard[weighter=rlw]": [
        {
            "total": 0.00876973569393158,
            "losses": [0.008824544958770275, 0.008426539599895477],
            "weights": [0.8622880578041077, 0.13771198689937592],
            "grad_norm": 0.0507933563457917,
        },
        {
            "total": 0.008186211809515953,
            "losses": [0.008271518163383007, 0.008180743083357811],
            "weights": [0.060243818908929825, 0.9397562146186829],
            "grad_norm": 0.04997344696602562,
        },
        {
            "total": 0.007973719388246536,
            "losses": [0.008003387600183487, 0.007933102548122406],
            "weights": [0.5778791308403015, 0.4221208691596985],
            "grad_norm": 0.046863561035041516,
        },
    ],
}


if __name__ == "__main__":
    main()
