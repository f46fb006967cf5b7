"""Signals: a training's stop flag (checked between steps, so it saves and exits cleanly), SIGTERM as
Ctrl-C elsewhere, and a deadline that cuts a block of work at a time budget. No torch here: the CLI installs
these before anything heavy is imported."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves and exits cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()

    def handler(signum: int, frame: object) -> None:
        flag.signum = signum

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals to the caller
        pass
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, outside a training's own handler (start-up, evaluation):
    a job scheduler's stop ends the command in one line, with what it finished kept."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DeadlinePassed(BaseException):
    """Raised inside a :func:`deadline` block once its time is up. A BaseException, as KeyboardInterrupt is, so
    that third-party code that catches Exception (an attack library's retry) does not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`DeadlinePassed` inside this block once ``seconds`` of wall time have passed: one call that
    the caller cannot split (an AutoAttack run) still ends within a time budget. ``None`` or infinite seconds, no
    SIGALRM (Windows) or not the main thread: the block runs uncut. Not nested: an inner deadline ends an outer
    one's timer. The exception comes between Python bytecodes (a long kernel finishes first), wherever the block
    then is: a context entered inside it may be left half-restored, so keep the state that matters in contexts
    entered before the deadline (as ``TimedEvaluation.row`` does). One alarm: code that swallows it runs on."""
    if seconds is None or not math.isfinite(seconds) or not hasattr(signal, "setitimer"):
        yield
        return
    armed = [True]

    def expire(signum: int, frame: object) -> None:
        if armed[0]:
            raise DeadlinePassed

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread
        yield
        return
    try:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
        yield
    finally:
        while True:  # an alarm landing in this cleanup, before the flag is down, interrupts it: start it again
            try:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                break
            except DeadlinePassed:
                continue


__all__ = ["DeadlinePassed", "StopFlag", "deadline", "sigterm_interrupts", "stop_on_signals"]
