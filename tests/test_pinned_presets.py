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
import textwrap
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
    "ca_mkd[feature_from_epoch=0]": ("ca_mkd", {"feature_from_epoch": 0}),  # its feature term is off in epoch 1
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
            for key, value in entry.items():
                line = f'            "{key}": {value!r},'
                if len(line) <= 120 or not isinstance(value, list):
                    lines.append(line)
                    continue
                lines.append(f'            "{key}": [')  # a long list: its values wrapped within 120 columns
                lines += textwrap.wrap(", ".join(map(repr, value)) + ",", 120, initial_indent=" " * 16,
                                       subsequent_indent=" " * 16, break_long_words=False)
                lines.append("            ],")
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
    "absld": [
        {
            "total": 0.008602270856499672,
            "losses": [0.00858982652425766, 0.008664494380354881],
            "weights": [0.8333333134651184, 0.1666666716337204],
            "grad_norm": 0.051014536690925205,
        },
    ],
    "iad": [
        {
            "total": 0.09024076908826828,
            "losses": [0.09024076908826828, 0.011071624234318733, 2.1986589431762695, 0.7928367853164673],
            "weights": [1.0, 0.0, 0.0, 0.0],
            "grad_norm": 0.48393802650253737,
        },
        {
            "total": 0.06914717704057693,
            "losses": [0.06914717704057693, 0.010286474600434303, 2.177332878112793, 0.7928380966186523],
            "weights": [1.0, 0.0, 0.0, 0.0],
            "grad_norm": 0.3650747928211865,
        },
        {
            "total": 0.05645938217639923,
            "losses": [0.05645938217639923, 0.009637217037379742, 2.1642239093780518, 0.7928373217582703],
            "weights": [1.0, 0.0, 0.0, 0.0],
            "grad_norm": 0.3061309038230463,
        },
    ],
    "adaad": [
        {
            "total": 0.008922230452299118,
            "losses": [0.008664494380354881, 0.008922230452299118],
            "weights": [0.0, 1.0],
            "grad_norm": 0.05215310114552264,
        },
    ],
    "adaiad": [
        {
            "total": 0.08018092066049576,
            "losses": [2.1986589431762695, 0.08018092066049576, 0.0002519981353543699],
            "weights": [0.0, 1.0, 0.0],
            "grad_norm": 0.41395012016404076,
        },
        {
            "total": 0.06368936598300934,
            "losses": [2.1985440254211426, 0.06368936598300934, 0.0003271789464633912],
            "weights": [0.0, 1.0, 0.0],
            "grad_norm": 0.32277393615236877,
        },
        {
            "total": 0.05353926122188568,
            "losses": [2.203386068344116, 0.05353926122188568, 0.0003583099169190973],
            "weights": [0.0, 1.0, 0.0],
            "grad_norm": 0.2795571547407674,
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
    "ciard": [
        {
            "total": 0.024228954687714577,
            "losses": [0.016832439228892326, 0.008436541073024273, -0.001040023984387517],
            "weights": [1.0, 1.0, 1.0],
            "grad_norm": 0.10521008717139652,
            "temperatures": [1.0010000467300415, 1.0],
        },
        {
            "total": 0.02298874408006668,
            "losses": [0.016057418659329414, 0.007948522455990314, -0.0010171984322369099],
            "weights": [1.0, 1.0, 1.0],
            "grad_norm": 0.09866960096628846,
            "temperatures": [1.002000093460083, 1.0],
        },
        {
            "total": 0.013112332671880722,
            "losses": [0.015581900253891945, 0.007528468035161495, -0.0009998034220188856],
            "weights": [1.0, 1.0, 10.0],
            "grad_norm": 0.08012813577214725,
            "temperatures": [1.0030001401901245, 1.0],
        },
    ],
    "dgad": [
        {
            "total": 0.08356181532144547,
            "losses": [0.08333387970924377, 0.08568383753299713, 5.777943897555815e-06],
            "weights": [0.9375, 0.0625, 1.0],
            "grad_norm": 0.4916024670611035,
        },
        {
            "total": 0.06320956349372864,
            "losses": [0.06294494867324829, 0.06365704536437988, 7.023446414677892e-06],
            "weights": [0.9375, 0.0625, 1.0],
            "grad_norm": 0.35932720877594054,
        },
        {
            "total": 0.051548149436712265,
            "losses": [0.051399510353803635, 0.05188194662332535, 7.890556844358798e-06],
            "weights": [0.9375, 0.0625, 1.0],
            "grad_norm": 0.295489596016973,
        },
    ],
    "avg_kd": [
        {
            "total": 2.2740936279296875,
            "losses": [2.1986589431762695, 0.07976274192333221, 0.0767267718911171, 0.06981486827135086],
            "weights": [1.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408],
            "grad_norm": 2.4704298965035325,
        },
        {
            "total": 1.9418272972106934,
            "losses": [1.855790138244629, 0.09041393548250198, 0.08715111762285233, 0.08054650574922562],
            "weights": [1.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408],
            "grad_norm": 1.354312107034516,
        },
        {
            "total": 1.7936880588531494,
            "losses": [1.6793313026428223, 0.11844421178102493, 0.1151718720793724, 0.10945404320955276],
            "weights": [1.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408],
            "grad_norm": 1.1622106611281717,
        },
    ],
    "ebkd": [
        {
            "total": 2.248948335647583,
            "losses": [2.1986589431762695, 0.07976274192333221, 0.0767267718911171, 0.06981486827135086],
            "weights": [1.0, 0.22219878435134888, 0.22214031219482422, 0.2223275899887085],
            "grad_norm": 2.4503463045915366,
        },
        {
            "total": 1.9107178449630737,
            "losses": [1.8503706455230713, 0.09500955045223236, 0.09161551296710968, 0.0849400982260704],
            "weights": [1.0, 0.22219878435134888, 0.22214031219482422, 0.2223275899887085],
            "grad_norm": 1.4188783682582837,
        },
        {
            "total": 1.752718448638916,
            "losses": [1.6673182249069214, 0.13227981328964233, 0.12910568714141846, 0.12291882187128067],
            "weights": [1.0, 0.22219878435134888, 0.22214031219482422, 0.2223275899887085],
            "grad_norm": 1.251455044923204,
        },
    ],
    "ca_mkd": [
        {
            "total": 2.2237837314605713,
            "losses": [
                2.1986589431762695, 0.07976274192333221, 0.0767267718911171, 0.06981486827135086, 0.46421241760253906,
                0.49043530225753784, 0.4796791672706604,
            ],
            "weights": [1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 0.0, 0.0, 0.0],
            "grad_norm": 2.4381158225597335,
        },
        {
            "total": 1.8772252798080444,
            "losses": [
                1.8455696105957031, 0.09972827881574631, 0.09618666768074036, 0.08945614844560623, 0.4758206605911255,
                0.4913467764854431, 0.4860478341579437,
            ],
            "weights": [1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 0.0, 0.0, 0.0],
            "grad_norm": 1.4868738640013996,
        },
        {
            "total": 1.7063225507736206,
            "losses": [
                1.658969759941101, 0.1465538591146469, 0.14341947436332703, 0.13683487474918365, 0.47332802414894104,
                0.49221211671829224, 0.4836987853050232,
            ],
            "weights": [1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 0.0, 0.0, 0.0],
            "grad_norm": 1.3422782111266742,
        },
    ],
    "aekd": [
        {
            "total": 2.2641499042510986,
            "losses": [2.1986589431762695, 0.07976274192333221, 0.0767267718911171, 0.06981486827135086],
            "weights": [1.0, 0.055804748088121414, 0.30419525504112244, 0.5400000214576721],
            "grad_norm": 2.461703201925657,
        },
        {
            "total": 1.93076491355896,
            "losses": [1.854644775390625, 0.0920725017786026, 0.08852098137140274, 0.08168931305408478],
            "weights": [1.0, 0.03953571990132332, 0.32046425342559814, 0.5400000214576721],
            "grad_norm": 1.3748442234984033,
        },
        {
            "total": 1.7792415618896484,
            "losses": [1.6751675605773926, 0.12299785763025284, 0.1192510724067688, 0.11297882348299026],
            "weights": [1.0, 0.036052118986845016, 0.32394787669181824, 0.5400000214576721],
            "grad_norm": 1.1798620329054008,
        },
    ],
    "fair_ard": [
        {
            "total": 0.008309710770845413,
            "losses": [0.008309710770845413],
            "weights": [1.0],
            "grad_norm": 0.041834708470968686,
        },
        {
            "total": 0.008744234219193459,
            "losses": [0.008135558106005192],
            "weights": [1.059027910232544],
            "grad_norm": 0.04384570159041392,
        },
        {
            "total": 0.00852225162088871,
            "losses": [0.0079329339787364],
            "weights": [1.059027910232544],
            "grad_norm": 0.04203875683110073,
        },
    ],
    "fair_rslad": [
        {
            "total": 0.008602270856499672,
            "losses": [0.00858982652425766, 0.008664494380354881],
            "weights": [0.8333333730697632, 0.1666666567325592],
            "grad_norm": 0.051014536690925205,
        },
        {
            "total": 0.0085298428311944,
            "losses": [0.008186067454516888, 0.008409231901168823],
            "weights": [0.8825232982635498, 0.17650464177131653],
            "grad_norm": 0.04835817215895027,
        },
        {
            "total": 0.008373884484171867,
            "losses": [0.008058019913733006, 0.008178875781595707],
            "weights": [0.8825232982635498, 0.17650464177131653],
            "grad_norm": 0.04712313088130513,
        },
    ],
    "fair_mtard": [
        {
            "total": 0.00874372199177742,
            "losses": [0.008824544958770275, 0.00866289995610714],
            "weights": [0.5, 0.5],
            "grad_norm": 0.05102568575390284,
        },
        {
            "total": 0.008657490834593773,
            "losses": [0.008262773975729942, 0.008401211351156235],
            "weights": [0.5293240547180176, 0.5297037959098816],
            "grad_norm": 0.04919687630448446,
        },
        {
            "total": 0.008403819054365158,
            "losses": [0.008002817630767822, 0.008163511753082275],
            "weights": [0.5291160941123962, 0.5299117565155029],
            "grad_norm": 0.04770954454976668,
        },
    ],
    "fitnet": [
        {
            "total": 47.94197463989258,
            "losses": [2.1986589431762695, 0.07976274192333221, 0.4566355049610138],
            "weights": [1.0, 1.0, 100.0],
            "grad_norm": 41.47943825243927,
        },
    ],
    "igdm": [
        {
            "total": 0.08933620899915695,
            "losses": [0.08922230452299118, 0.08664494007825851, 0.0011390087893232703],
            "weights": [1.0, 0.0, 0.10000000149011612],
            "grad_norm": 0.5216405203573407,
        },
        {
            "total": 0.06470894813537598,
            "losses": [0.06457935273647308, 0.06444244086742401, 0.0012959872838109732],
            "weights": [1.0, 0.0, 0.10000000149011612],
            "grad_norm": 0.3627953160424028,
        },
        {
            "total": 0.05303572863340378,
            "losses": [0.05293669179081917, 0.0525716170668602, 0.0009903827449306846],
            "weights": [1.0, 0.0, 0.10000000149011612],
            "grad_norm": 0.298302763093265,
        },
    ],
    "natural": [
        {
            "total": 2.1986587047576904,
            "losses": [2.1986587047576904],
            "weights": [1.0],
            "grad_norm": 2.4332315564330487,
        },
    ],
    "nfgsm": [
        {
            "total": 2.43707013130188,
            "losses": [2.43707013130188],
            "weights": [1.0],
            "grad_norm": 2.0645191074889078,
        },
    ],
    "sat": [
        {
            "total": 2.5237176418304443,
            "losses": [2.5237176418304443],
            "weights": [1.0],
            "grad_norm": 2.4089263203974096,
        },
    ],
    "peeraid": [
        {
            "total": 2.4197003841400146,
            "losses": [0.0164941418915987, 4.169491876382381e-05, 0.01674281246960163],
            "weights": [1.0, 1.0, 0.10000000149011612],
            "grad_norm": 0.061453175591307724,
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
    "saad": [
        {
            "total": 0.0009956887224689126,
            "losses": [0.08645110577344894, 0.0013791987439617515, 0.08664494007825851],
            "weights": [0.011064708232879639, 5.532354043680243e-05, 0.0],
            "grad_norm": 0.006247259548335697,
        },
        {
            "total": 0.0009182885405607522,
            "losses": [0.08483804762363434, 0.0014000523369759321, 0.08633360266685486],
            "weights": [0.010361149907112122, 5.18057458975818e-05, 0.0],
            "grad_norm": 0.005721000989421751,
        },
        {
            "total": 0.0008372908341698349,
            "losses": [0.08547832071781158, 0.0008670806419104338, 0.08605018258094788],
            "weights": [0.009413585066795349, 4.706792606157251e-05, 0.0],
            "grad_norm": 0.005189202073298992,
        },
    ],
    "trades": [
        {
            "total": 2.2053472995758057,
            "losses": [2.1986589431762695, 0.0011147423647344112],
            "weights": [1.0, 6.0],
            "grad_norm": 2.437860936629133,
        },
    ],
    "trades_mtard": [
        {
            "total": 2.205674171447754,
            "losses": [2.1986589431762695, 0.0011692101834341884],
            "weights": [1.0, 6.0],
            "grad_norm": 2.4350418962940314,
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
    "ca_mkd[feature_from_epoch=0]": [
        {
            "total": 10.221232414245605,
            "losses": [
                2.1986589431762695, 0.07976274192333221, 0.0767267718911171, 0.06981486827135086, 0.46421241760253906,
                0.49043530225753784, 0.4796791672706604,
            ],
            "weights": [
                1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 5.263368129730225, 5.769250869750977,
                5.634047031402588,
            ],
            "grad_norm": 5.555956531061592,
        },
        {
            "total": 8.45048713684082,
            "losses": [
                1.9661290645599365, 0.08904612809419632, 0.08353662490844727, 0.07674083113670349, 0.3988684415817261,
                0.39388006925582886, 0.37225013971328735,
            ],
            "weights": [
                1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 5.546581745147705, 5.691547393798828,
                5.428536891937256,
            ],
            "grad_norm": 4.269152138002291,
        },
        {
            "total": 6.837355613708496,
            "losses": [
                1.8943904638290405, 0.11402184516191483, 0.10653270035982132, 0.10327852517366409, 0.26784878969192505,
                0.3020523488521576, 0.31456583738327026,
            ],
            "weights": [
                1.0, 0.11033746600151062, 0.11167549341917038, 0.1113203838467598, 5.450837135314941, 5.694724082946777,
                5.521104335784912,
            ],
            "grad_norm": 3.435007400656279,
        },
    ],
}


if __name__ == "__main__":
    main()
