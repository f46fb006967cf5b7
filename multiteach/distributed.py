"""Distributed data parallel through PyTorch's own engine (torchrun + DistributedDataParallel).

``DistContext.from_env()`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). Every
rank all-reduces the per-branch losses before the weighter, so all ranks compute the same weights.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


class LostRankError(RuntimeError):
    """A collective failed: another rank died, was killed, or did not answer within the timeout."""


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistBackendError", ())) or isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float | None = None) -> DistContext:
        """Join the process group torchrun describes; a single process when WORLD_SIZE is unset or 1.

        ``timeout_s`` (default: $MULTITEACH_DIST_TIMEOUT or 600) bounds how long a rank waits for the others
        in a collective before it fails instead of hanging."""
        if timeout_s is None:
            timeout_s = float(os.environ.get("MULTITEACH_DIST_TIMEOUT", "600"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, local_rank)

    def device(self, requested: str) -> str:
        """On CUDA each rank takes its local GPU."""
        if self.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def mean(self, t: Tensor) -> Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world

    def sum(self, t: Tensor) -> Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)).item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap the student (the bare module keeps serving attacks, which need no gradient sync). SyncBatchNorm
        is the trainer's job (one path: ``TrainConfig.sync_bn``)."""
        if not self.enabled:
            return model
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)  # BN buffers from rank 0

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """All-reduce (mean) gradients of trainable parameters outside the DDP module (e.g. UW's)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world

    @contextlib.contextmanager
    def lost_rank_guard(self) -> Iterator[None]:
        """Turn a collective that failed because another rank died or timed out into one clear error."""
        try:
            yield
        except RuntimeError as e:
            if not self.enabled or not _is_comm_error(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise LostRankError(
                f"rank {self.rank}/{self.world}: lost contact with the other ranks ({first}). Another rank "
                "failed or was killed: read its log; the last checkpoint is kept, so rerun the same "
                "command to resume"
            ) from e

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["DistContext", "LostRankError"]
