"""Signals: a training's stop flag (checked between steps, so it saves and exits cleanly) and SIGTERM as
Ctrl-C elsewhere. No torch here: the CLI installs these before anything heavy is imported."""

from __future__ import annotations

import contextlib
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


__all__ = ["StopFlag", "sigterm_interrupts", "stop_on_signals"]
