"""The presets, one file per method family; importing this package registers them all in ``PRESETS``.

A preset takes a student (a module or a timm name) and its teachers (``Teacher``, module or timm name) and
returns a :class:`~multiteach.Recipe`. Settings come from the official repositories and papers, stated in
each docstring; ``PRESETS`` lists them with a one-line description, their teacher roles and their official
training schedule. All attacks are L-inf, eps 8/255, inputs in [0, 1], unless a preset says otherwise.
"""

from . import (  # noqa: F401  (each module registers its presets)
    absld,
    adaad,
    ard,
    ciard,
    dgad,
    ensemble,
    fair_ard,
    fitnet,
    iad,
    igdm,
    mtard,
    natural,
    peeraid,
    rslad,
    saad,
    trades,
)
