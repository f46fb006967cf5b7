"""Where and in what precision a run executes: device choice, autocast, seeding, interrupt handling."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from .signals import StopFlag, stop_on_signals  # re-exported: their historical home

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU. Asking for a device this machine lacks (CUDA, a CUDA index
    beyond its GPUs, MPS) is refused, not silently run on the CPU at a hundredth of the speed."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but this machine has no usable CUDA GPU: set device = 'auto' or 'cpu'"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r} asked for, but this machine has {n} CUDA GPU(s) (cuda:0 to "
                             f"cuda:{n - 1}): set device = 'cuda', 'auto' or 'cpu'")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {device!r} is not available on this machine: use 'cpu' or 'auto'")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``"auto"``: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device: use precision 'fp32' (or 'bf16') on the CPU")
    return precision


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core convolutions and matmuls (10-bit mantissa) on or off inside the block, restored after.

    cuDNN runs fp32 convolutions in TF32 by default on Ampere and later GPUs, so a figure reported as fp32 must
    turn it off; training and model selection may leave it on. No effect on the CPU. Where the user set the
    per-backend ``fp32_precision`` API (torch >= 2.9), which refuses the legacy getters, it is set through that."""
    def legacy(conv: bool, matmul: str) -> None:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)

    def per_backend(matmul: str, conv: str) -> None:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv

    try:  # the user's settings, "medium" (bf16 matmuls) too, are restored after the block
        apply, saved = legacy, (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        wanted: tuple = (enabled, "high" if enabled else "highest")
    except RuntimeError:  # "mix of the legacy and new APIs": the new one is in use
        apply = per_backend
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        wanted = ("tf32", "tf32") if enabled else ("ieee", "ieee")
    apply(*wanted)
    try:
        yield
    finally:
        apply(*saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # generators take their state as a CPU byte tensor
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


__all__ = ["Precision", "StopFlag", "autocast", "resolve_device", "resolve_precision", "rng_state",
           "seed_everything", "set_rng_state", "stop_on_signals", "tf32"]
