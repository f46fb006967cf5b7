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
PINNED: dict[str, list[dict[str, Any]]] = {}


if __name__ == "__main__":
    main()
