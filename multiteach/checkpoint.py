"""Checkpoints: written atomically (temp file, fsync, rename), read with ``weights_only=True``."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .rundir import pid_alive

# Keys of published checkpoints that hold no weights of the model (TRADES' WRN keeps an unused block).
_IGNORED_PREFIXES = ("sub_block1.",)
_WRAPPER_KEYS = ("model", "state_dict", "student", "net", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unsafe, or of another architecture."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file-size limit): the previous file is kept."""


_WRITE_FAILURES = {  # errno: (what happened, the fix)
    getattr(errno, "EDQUOT", -1): ("the disk quota is exhausted", "free space (or move run_dir to another disk)"),
    errno.ENOSPC: ("the disk is full", "free space (or move run_dir to another disk)"),
    errno.EFBIG: ("the file-size limit was reached", "raise it (ulimit -f unlimited)"),
}


class _RecordingWriter:
    """A file that remembers the OSError of a failed write: torch.save reports it only as an opaque
    RuntimeError ("unexpected pos ...")."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    A write that fails (a full disk, a file-size limit, an unwritable folder) removes its temp file, keeps the
    previous ``path`` and raises :class:`CheckpointWriteError` naming the file and the fix."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically as :func:`atomic_save` does: a kill mid-write leaves the old
    file or the new one (a run's done.json, run.json), never a torn one that a rerun could not read."""
    text = json.dumps(obj, indent=2).encode()
    return _atomic_write(path, lambda f: f.write(text))


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """``write(f)`` into a temp file beside ``path`` (fsynced), then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = writer.error if writer is not None and writer.error is not None else e
        if not isinstance(cause, OSError):
            raise
        raise _write_error(path, cause) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def _write_error(path: Path, e: OSError) -> CheckpointWriteError:
    kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
    known = _WRITE_FAILURES.get(e.errno or 0)
    why, fix = known or (e.strerror or str(e), "make its folder writable (or use another run_dir)")
    detail = f" ({e.strerror})" if known and e.strerror else ""
    return CheckpointWriteError(f"writing {str(path)!r} failed: {why}{detail}; {kept}, no temp file left: {fix} "
                                "and run the same command again to resume")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found: check the path (or train that stage first)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled objects other than tensors and plain containers, and is "
            f"refused (weights_only=True): re-save only its state_dict. Detail: {detail or type(e).__name__}"
        ) from None
    except Exception as e:  # not a torch.save file at all (text, a truncated zip, another format): one line
        what = f"{type(e).__name__}: {e}" if not isinstance(e, (RuntimeError, EOFError, OSError)) else str(e)
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({what}): is it a torch.save file?") from None


def state_dict_of(obj: Any) -> dict[str, Tensor]:
    """The model weights inside a checkpoint: a raw state_dict or one under a usual key, ``module.`` stripped."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state_dict (a dict of tensors, possibly under 'model')")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith(_IGNORED_PREFIXES):
            out[k] = v
    return out


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's weights into ``model``, or say plainly why they do not fit it."""
    sd = state_dict_of(load_checkpoint(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    heads = [k for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if not missing and not unexpected and 0 < len(heads) <= 2 and all(
            sd[k].shape[1:] == own[k].shape[1:] for k in heads):  # only the classifier's rows differ
        k = heads[0]
        raise CheckpointError(
            f"checkpoint {str(path)!r} has {sd[k].shape[0]} classes ({k}), the data {own[k].shape[0]}: evaluate "
            f"or distil it on data with {sd[k].shape[0]} classes (check the dataset and data folder)")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {', '.join(parts)} keys. "
            f"Was it saved from another architecture or class count?{_recorded_model(path)}"
        )
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values (NaN or inf), first in {bad!r}: "
                              "it comes from a diverged run; use an earlier checkpoint")
    model.load_state_dict(sd)
    return model


def _recorded_model(path: str | os.PathLike) -> str:
    """' It records model X with N classes.' where a multiteach checkpoint says what wrote it."""
    try:
        cfg = load_checkpoint(path).get("experiment", {}).get("config", {})
        model = cfg.get("student", {}).get("model")
    except (CheckpointError, AttributeError):
        return " Name the matching model."
    if not model:
        return " Name the matching model."
    return f" It records model {model!r} (dataset {cfg.get('data', {}).get('dataset', '?')}): name that model."


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files ``atomic_save`` leaves when a process is killed mid-write (``.NAME.tmpPID`` of a
    process that no longer runs); returns the files removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


__all__ = ["CheckpointError", "CheckpointWriteError", "atomic_save", "atomic_write_json", "load_checkpoint",
           "load_weights", "remove_stale_temps", "state_dict_of"]
