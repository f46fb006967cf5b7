"""Wall-clock budgets: a run that must end, with its table, inside a fixed number of seconds.

Two pieces, both driven by an injectable clock (tests use a fake one):

* :class:`TimeBudget` splits one deadline among named stages. Each stage, when it starts, gets its share of
  the time *still left* (after the seconds reserved for evaluation), so a stage that ran long shortens the
  ones after it instead of pushing the run past its deadline. An earlier hard ``deadline`` (a scheduler's wall
  limit, a device call's) shortens what is left without renaming the stages.
* :class:`EpochPlanner` turns one stage's seconds into an epoch count from the throughput measured in the
  stage's first steps (after the warm-up steps that autotune and capture graphs), and shortens the plan at an
  epoch end if the stage runs behind: by the median of its last epochs' wall times and the recurring cost of its
  validations, so a one-off cost (the first validation's warm-up, a stall) does not cut epochs the time still
  holds, and a lasting slow-down does. The LR schedule follows the planned epochs, so a budgeted run anneals to
  its end instead of being cut off at a high learning rate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]


class TimeBudget:
    """``total_s`` seconds from ``start`` (default: now), shared by ``shares`` (stage -> weight), with
    ``reserve_s`` seconds kept back for what follows the stages (evaluation, the table).

    ``deadline`` (a time on ``clock``), if given, is a hard end before ``start + total_s``: a call with less time
    than its budget. It shortens the time :meth:`left`, so the stages and the evaluation fit it, but not
    :meth:`nominal`: the stages keep the names the budget gives them (cached teachers stay found)."""

    def __init__(self, total_s: float, shares: Mapping[str, float], reserve_s: float = 0.0,
                 clock: Clock = time.perf_counter, start: float | None = None, deadline: float | None = None) -> None:
        if total_s <= 0:
            raise ValueError(f"the time budget must be > 0 seconds, got {total_s}")
        if not shares or any(w <= 0 for w in shares.values()):
            raise ValueError(f"stage shares must be positive weights, got {dict(shares)}")
        self.total_s, self.shares, self.reserve_s, self.clock = float(total_s), dict(shares), float(reserve_s), clock
        self.start = clock() if start is None else start
        self.deadline = deadline
        self.spent: dict[str, float] = {}
        self.allotted: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds until the budget's end or the hard deadline, whichever comes first (negative once past it)."""
        left = self.total_s - self.elapsed()
        return left if self.deadline is None else min(left, self.deadline - self.clock())

    def nominal(self, stage: str) -> float:
        """``stage``'s share of the budget less the reserve, whatever the stages before it took: what names a
        budgeted stage (a stage trained for a 75-s budget is not the one a 540-s budget asks for), where
        :meth:`allot`'s seconds vary from run to run with the time the earlier stages and the setup took (a stage
        after a cached or given one is allotted more, under the same name)."""
        if stage not in self.shares:
            raise KeyError(f"unknown stage {stage!r}: the budget has {', '.join(self.shares)}")
        return max(self.total_s - self.reserve_s, 0.0) * self.shares[stage] / sum(self.shares.values())

    def allot(self, stage: str, at_most: float | None = None, hold_s: float | None = None) -> float:
        """Start ``stage``: its share of the time left before the reserve, among the stages not yet run (or
        ``at_most`` seconds, if fewer: a stage timed like another run's). ``hold_s``: the seconds to keep back
        instead of the reserve (the last stage, before an evaluation of fewer rows than the reserve is sized for)."""
        if stage not in self.shares:
            raise KeyError(f"unknown stage {stage!r}: the budget has {', '.join(self.shares)}")
        pending = [s for s in self.shares if s not in self.spent and s not in self._open]
        if stage not in pending:
            raise ValueError(f"stage {stage!r} was already started")
        weight = sum(self.shares[s] for s in pending)
        # never zero: a stage that starts late still trains its minimum (one epoch), so the run ends with a table
        hold = self.reserve_s if hold_s is None else hold_s
        seconds = max(max(self.left() - hold, 0.0) * self.shares[stage] / weight, 1.0)
        if at_most is not None:
            seconds = min(seconds, at_most)
        self.allotted[stage] = seconds
        self._open[stage] = self.clock()
        return seconds

    def finish(self, stage: str) -> float:
        """End ``stage``; returns the seconds it took."""
        self.spent[stage] = self.clock() - self._open.pop(stage)
        return self.spent[stage]

    def skip(self, stage: str) -> None:
        """A stage that will not run (its model was given): its share goes to the others."""
        self.spent[stage] = 0.0

    def summary(self) -> dict[str, Any]:
        wall = {} if self.deadline is None else {"deadline_in_s": round(self.deadline - self.start, 1)}
        return {"budget_s": self.total_s, **wall, "elapsed_s": round(self.elapsed(), 1),
                "stages": {s: {"allotted_s": round(self.allotted.get(s, 0.0), 1), "spent_s": round(t, 1)}
                           for s, t in self.spent.items()}}


@dataclass
class EpochPlanner:
    """Epochs that fit ``seconds``, from the step rate measured after ``skip`` warm-up steps.

    Call ``begin`` when the stage starts and ``on_step`` after every optimizer step (``sync`` waits for the
    device at the two timing points only); ``on_step`` returns the planned epoch count once the rate is
    known. ``on_epoch_end`` re-plans from the median wall time of the last ``window`` epochs (epoch end to
    epoch end; the first epoch, which holds the warm-up, never counts) plus the recurring cost beyond it (the
    validations every few epochs, averaged over the epochs, the largest excess left out as one-off), or from
    the rate since the warm-up until an epoch after the first has ended, and only ever shortens the plan. A
    one-off cost left in the average (the first validation's autotuning: 5 of the natural teacher's 23 epochs
    and 6 of the SAT teacher's 35 in H200 run 2) no longer cuts epochs the time still holds. ``fraction`` of the
    seconds is planned for, the rest is headroom.
    """

    seconds: float
    steps_per_epoch: int
    min_epochs: int = 1
    max_epochs: int | None = None
    skip: int = 8
    measure: int = 24
    fraction: float = 0.92
    window: int = 3
    clock: Clock = time.perf_counter
    sync: Callable[[], None] = lambda: None
    epochs: int | None = None  # the plan, once made (a resumed stage passes the plan it made)
    step_s: float | None = field(default=None, init=False)
    _start: float = field(default=0.0, init=False)
    _steps: int = field(default=0, init=False)
    _t_skip: float | None = field(default=None, init=False)
    _ends: dict[int, float] = field(default_factory=dict, init=False)  # epochs done -> clock at that epoch end

    def begin(self) -> None:
        self._start, self._steps, self._t_skip = self.clock(), 0, None
        self._ends.clear()
        if self.skip <= 0:  # no warm-up to leave out: time from the start
            self.sync()
            self._t_skip = self.clock()

    def _clip(self, n: int) -> int:
        n = max(n, self.min_epochs)
        return min(n, self.max_epochs) if self.max_epochs else n

    def on_step(self, epochs_done: float = 0.0) -> int | None:
        """After one optimizer step (``epochs_done``: the epoch progress so far): the plan, at the step
        that completes the measurement, else ``None``."""
        self._steps += 1
        if self._steps == self.skip:
            self.sync()
            self._t_skip = self.clock()
        elif self._steps == max(self.skip, 0) + self.measure and self._t_skip is not None:
            self.sync()
            now = self.clock()
            self.step_s = (now - self._t_skip) / self.measure
            if self.epochs is None:
                left = self.seconds * self.fraction - (now - self._start)
                fits = math.floor(epochs_done + left / (self.step_s * self.steps_per_epoch))
                self.epochs = max(self._clip(fits), math.ceil(epochs_done))  # at least the epoch in progress
            return self.epochs
        return None

    def on_epoch_end(self, epochs_done: int, planned: int) -> int:
        """The plan after ``epochs_done`` epochs: ``planned``, or fewer if the stage runs behind (the epoch
        just finished when the time is already up). Before the plan is made only the deadline cuts."""
        now = self.clock()
        self._ends[epochs_done] = now
        if epochs_done >= planned:
            return planned
        left = self.seconds - (now - self._start)
        if left <= 0:
            self.epochs = epochs_done
            return epochs_done
        per_epoch = self._epoch_s(now)
        if self.epochs is None or per_epoch is None:
            return planned
        fits = epochs_done + math.floor(left / per_epoch)
        if fits >= planned:
            return planned
        if fits == epochs_done and left < per_epoch / 2:  # not even half an epoch left: stop here
            self.epochs = epochs_done
        else:
            self.epochs = max(fits, epochs_done + 1)
        return self.epochs

    def _epoch_s(self, now: float) -> float | None:
        """Seconds per epoch: the (lower) median of the last ``window`` whole epochs after the first, plus what
        the epochs took beyond it (validations every few epochs) spread over all of them, the largest excess
        left out as one-off; else the average rate since the warm-up (``None`` before it is measured)."""
        spans = [self._ends[e] - self._ends[e - 1] for e in sorted(self._ends) if e - 1 in self._ends]
        if spans:
            base = statistics.median_low(spans[-self.window:])
            recurring = sorted(max(s - base, 0.0) for s in spans)[:-1]
            return max(base + sum(recurring) / len(spans), 1e-9)
        timed = self._steps - max(self.skip, 0)
        if self._t_skip is None or timed <= 0:
            return None
        return (now - self._t_skip) / timed * self.steps_per_epoch


__all__ = ["EpochPlanner", "TimeBudget"]
