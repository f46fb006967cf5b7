"""One run per run directory: a lock file naming its holder, taken over only from a dead process.

Two trainings writing the same ``run_dir`` would overwrite each other's checkpoints and interleave their
logs; the second is refused instead, with the holder's pid and host. A lock left by a killed process of
this host is stale and taken over, so a resume after SIGKILL is never blocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK = ".multiteach.lock"


class RunDirBusyError(ValueError):
    """Another live process trains in this run directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.multiteach.lock`` (created atomically) for the block."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _holder(self) -> dict | None:
        for attempt in range(2):
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):  # vanished, being written, or half-written by a killed process
                if attempt == 0:
                    time.sleep(0.2)
        return None

    def _mine(self, holder: dict | None) -> bool:
        return holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]

    def _stale(self, holder: dict | None) -> bool:
        """An unreadable lock, this process's own, or one of a process of this host that is gone."""
        if holder is None or self._mine(holder):
            return True
        pid = holder.get("pid")
        return not isinstance(pid, int) or (holder.get("host") == self.me["host"] and not pid_alive(pid))

    def _take_over(self) -> None:
        """Remove a stale lock, under an flock on a guard file and only if it is still stale there: two processes
        that both found it stale would otherwise both remove it, the slower one removing the faster one's new
        lock, and both would train. The guard file stays (removing it would let a third process lock another)."""
        with open(self.path.with_name(LOCK + ".takeover"), "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
            except OSError:  # a filesystem without flock: unguarded, as before
                pass
            if self._stale(self._holder()):
                self.path.unlink(missing_ok=True)

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self._take_over()  # checked again there: another process may have taken it over meanwhile
                    continue
                raise RunDirBusyError(
                    f"run directory {str(self.path.parent)!r} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {holder.get('since', '?')}): wait for it, stop it, or use "
                    f"another run_dir (if that process is gone, delete {str(self.path)!r})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            return
        raise RunDirBusyError(f"could not take the lock {str(self.path)!r}: another process keeps taking it")

    def release(self) -> None:
        if self._mine(self._holder()):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


__all__ = ["LOCK", "RunDirBusyError", "RunLock", "pid_alive"]
