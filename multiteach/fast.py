"""The CUDA fast path: BN-folded low-precision teachers and CUDA-graph replay of attacks and teachers.

An adversarial-distillation step is dominated by many small launches (PGD-10 is ten forward/backward pairs
of the student) and by the teachers' forwards. ``accelerate(recipe)`` folds each teacher's eval-mode
BatchNorm into its convolutions, keeps its weights in bf16, and records every input transform and teacher
forward as a CUDA graph (one per input shape) that later steps replay, so the host issues a handful of
launches per step instead of thousands. Graphs read the live student weights and BN buffers (they are
updated in place), and draw their random starts from the graph-safe CUDA generator. Nothing here runs on
the CPU: there the recipe is used as written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .recipe import Recipe
from .teachers import Teacher


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv -> BatchNorm pair folded into the conv (torch.fx).

    Models that fx cannot trace are returned unchanged (with a warning): folding is an optimisation only.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=False)
    except Exception as e:  # tracing failures surface as many exception types
        warnings.warn(f"BatchNorm folding skipped for {type(model).__name__}: {type(e).__name__}: {e}", stacklevel=2)
        return model


class CapturedCall:
    """Replays ``fn(*tensors)`` from a CUDA graph recorded on the first call for each input shape.

    Inputs are copied into static buffers, the graph is replayed, and a copy of the output returned.
    ``None`` inputs are passed through as ``None``.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[Any, tuple[list[Tensor | None], Tensor, torch.cuda.CUDAGraph]] = {}

    def _autocast(self) -> Any:
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if enabled else torch.float32
        # the weight-cast cache must be off inside graphs: casts are re-done on every replay
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

    def __call__(self, *args: Tensor | None) -> Tensor:
        key = tuple(None if a is None else (a.shape, a.dtype, a.stride()) for a in args) + (
            torch.is_autocast_enabled("cuda"), torch.is_grad_enabled())
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        static_in, static_out, graph = self._graphs[key]
        for buf, a in zip(static_in, args):
            if buf is not None:
                buf.copy_(a)
        graph.replay()
        return static_out.clone()  # the static buffer is overwritten by the next replay

    def _capture(self, args: tuple[Tensor | None, ...]) -> tuple[list[Tensor | None], Tensor, torch.cuda.CUDAGraph]:
        static_in = [None if a is None else a.detach().clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():
            for _ in range(self.warmup):  # cuDNN autotuning and lazy init happen outside the graph
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast():
            static_out = self.fn(*static_in)
        return static_in, static_out, graph


def accelerate(recipe: Recipe, precision: str = "bf16", graphs: bool = True, compile: bool = False) -> Recipe:
    """Switch a recipe on CUDA to the fast path (see the module docstring); returns the same recipe.

    ``compile``: also ``torch.compile`` the student the attacks run and the teachers' folded copies, so
    their BatchNorm/ReLU/residual chains become fused kernels (minutes of compilation at the first step).
    """
    device = next(recipe.student.parameters()).device
    if device.type != "cuda":
        return recipe
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for teacher in recipe.teachers:
        if isinstance(teacher, Teacher):
            fast = _fast_teacher(teacher.model, low)
            teacher.set_fast_forward(torch.compile(fast) if compile else fast)
    if graphs:
        student = torch.compile(recipe.student) if compile else recipe.student
        for b in recipe.branches:
            for t in (b.transform, b.teacher_input):
                if t is not None and id(t) not in recipe.runners and getattr(t, "steps", 0):
                    model = t.model if t.model is not None else student
                    recipe.runners[id(t)] = _graphed_transform(t, model)
        for teacher in recipe.teachers:
            if isinstance(teacher, Teacher):
                recipe.runners[id(teacher)] = CapturedCall(_no_grad(teacher))
    return recipe


def _fast_teacher(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    fast = fold_batchnorm(model)
    if fast is model:
        import copy

        fast = copy.deepcopy(model)
    fast.requires_grad_(False).eval()
    if dtype is not None:
        fast.to(dtype)
    return fast.to(memory_format=torch.channels_last)


def _graphed_transform(t: Any, model: nn.Module) -> CapturedCall:
    def run(x: Tensor, y: Tensor, ref: Tensor | None) -> Tensor:
        return t(model, x, y, ref)

    return CapturedCall(run)


def _no_grad(teacher: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return teacher(x)

    return run


__all__ = ["CapturedCall", "accelerate", "fold_batchnorm"]
