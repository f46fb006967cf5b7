"""The presets by name: each method as a few lines wiring the same interfaces (code in ``multiteach.methods``).

``PRESETS`` is the registry (name -> entry with ``fn``, ``description``, ``teachers``, ``schedule``);
``mtard``, ``rslad``, ... are the preset functions themselves.
"""

from __future__ import annotations

from .methods._common import as_student, as_teacher, register, training_pgd, weighter_for
from .methods.ard import ard
from .methods.mtard import baseline, baseline_mt, bmtard, mtard, mtard3, multi_teacher
from .methods.natural import natural, nfgsm, sat
from .methods.rslad import rslad
from .methods.trades import trades
from .recipe import Branch
from .registry import PRESETS, Entry

PresetInfo = Entry


def get_preset(name: str) -> Entry:
    """The registered preset ``name``; a one-line error listing the choices when there is none."""
    return PRESETS.get_entry(name)


__all__ = ["PRESETS", "Branch", "PresetInfo", "ard", "as_student", "as_teacher", "baseline", "baseline_mt",
           "bmtard", "get_preset", "mtard", "mtard3", "multi_teacher", "natural", "nfgsm", "register", "rslad", "sat",
           "trades", "training_pgd", "weighter_for"]
