"""The CUDA fast path: BN-folded low-precision teachers and CUDA-graph replay of attacks and teachers.

An adversarial-distillation step is dominated by the attack (PGD-10 is ten forward/backward passes of the
student in eval mode), the teachers' forwards, and many small launches. ``accelerate(recipe)`` folds each
teacher's eval-mode BatchNorm into its convolutions and keeps its weights in bf16; runs eval-mode attacks
on a BN-folded view of the student (re-folded from the live weights every step); and records every input
transform and teacher forward as a CUDA graph (one per input shape) that later steps replay, so the host
issues a handful of launches per step instead of thousands. Graphs read the live student weights and BN
buffers (they are updated in place), and draw their random starts from the graph-safe CUDA generator.
Nothing here runs on the CPU: there the recipe is used as written.
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


class FoldedEval(nn.Module):
    """An eval-mode view of a *training* model with each conv -> BatchNorm pair folded into one conv.

    Attacks run the student in eval mode ten times a step; there BatchNorm is a per-channel affine map that
    folds into the preceding convolution, which removes every BN kernel from the attack's forward and
    backward passes. ``refresh()`` re-folds from the live weights and running statistics (in place, so it
    can run inside a CUDA graph); everything else (including unfoldable BNs) is shared with the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import torch.fx as fx

        graph_module = fx.symbolic_trace(model)
        modules = dict(graph_module.named_modules())
        self.pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]] = []
        for node in list(graph_module.graph.nodes):
            bn = modules.get(node.target) if node.op == "call_module" else None
            src = node.args[0] if bn is not None and node.args else None
            if not isinstance(bn, nn.BatchNorm2d) or not isinstance(src, fx.Node) or src.op != "call_module":
                continue
            conv = modules.get(src.target)
            if not isinstance(conv, nn.Conv2d) or len(src.users) != 1 or not bn.track_running_stats:
                continue
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
            folded.to(conv.weight.device).requires_grad_(False)
            folded.weight.data = folded.weight.data.contiguous(
                memory_format=torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format)
            graph_module.add_submodule(f"_folded{len(self.pairs)}", folded)
            with graph_module.graph.inserting_after(src):
                new = graph_module.graph.call_module(f"_folded{len(self.pairs)}", src.args, src.kwargs)
            node.replace_all_uses_with(new)
            graph_module.graph.erase_node(node)
            graph_module.graph.erase_node(src)
            self.pairs.append((conv, bn, folded))
        graph_module.graph.lint()
        graph_module.recompile()
        self.net = graph_module
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        for conv, bn, folded in self.pairs:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
            folded.bias.copy_(bias * scale + bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def folded_eval(model: nn.Module) -> nn.Module | None:
    """``FoldedEval(model)``, or ``None`` (with a warning) when the model cannot be traced or has no pair."""
    try:
        folded = FoldedEval(model)
    except Exception as e:
        warnings.warn(f"attack-time BN folding skipped for {type(model).__name__}: {type(e).__name__}: {e}",
                      stacklevel=2)
        return None
    return folded if folded.pairs else None


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
        folded = folded_eval(recipe.student)
        for b in recipe.branches:
            for t in (b.transform, b.teacher_input):
                if t is not None and id(t) not in recipe.runners and getattr(t, "steps", 0):
                    if t.model is not None:
                        model, refresh = t.model, None
                    elif folded is not None and getattr(t, "bn_mode", None) == "eval":
                        model, refresh = folded, folded.refresh
                    else:
                        model, refresh = recipe.student, None
                    recipe.runners[id(t)] = _graphed_transform(t, torch.compile(model) if compile else model, refresh)
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


def _graphed_transform(t: Any, model: nn.Module, refresh: Callable[[], None] | None) -> CapturedCall:
    def run(x: Tensor, y: Tensor, ref: Tensor | None) -> Tensor:
        if refresh is not None:
            refresh()  # fold the live student weights and BN statistics (recorded in the graph)
        return t(model, x, y, ref)

    return CapturedCall(run)


def _no_grad(teacher: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return teacher(x)

    return run


__all__ = ["CapturedCall", "FoldedEval", "accelerate", "fold_batchnorm", "folded_eval"]
