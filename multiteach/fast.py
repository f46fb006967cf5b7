"""The CUDA fast path: components that are faster versions of themselves.

An adversarial-distillation step is dominated by the attack (PGD-10 is ten forward/backward passes of the
student in eval mode), the teachers' forwards, and many small launches. ``accelerate(recipe)`` replaces, in
place and visibly, each component that declares it allows it by a faster one of the same kind:

- a frozen :class:`~multiteach.Teacher` by a :class:`FastTeacher` (a Teacher): under autocast it runs a copy
  with its eval-mode BatchNorm folded into the convolutions, in bf16, replayed from a CUDA graph; fp32 calls
  (evaluation) run the exact model;
- a ``graph_safe`` :class:`~multiteach.InputTransform` by a :class:`GraphedTransform` (an InputTransform):
  recorded once per input shape as a CUDA graph and replayed, attacking a BN-folded eval-mode view of the
  student re-folded from its live weights every step. It re-records when the transform's settings change.

What stays eager (a trainable teacher, a teacher read for its features, a user transform that is not
graph-safe) is named once in the log. Graphs read the live student weights and BN buffers (updated in place)
and draw their random starts from the graph-safe CUDA generator. On the CPU the recipe is left as written,
unless a ``capture`` that runs there is given (the tests pass an eager stand-in for the CUDA graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .recipe import Recipe, _key
from .teachers import Teacher
from .transforms import InputTransform, WrappedTransform, module_mode


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

        with module_mode(model, "eval"):  # the trace fixes `self.training`: an eval-mode view has no dropout
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


class FastTeacher(Teacher):
    """A frozen teacher whose forwards under autocast run a BN-folded low-precision copy (replayed from a CUDA
    graph with ``graphs``); fp32 forwards (evaluation) run the exact model."""

    def __init__(self, teacher: Teacher, dtype: torch.dtype | None, graphs: bool = True, compile: bool = False,
                 capture: Callable[..., Any] = CapturedCall) -> None:
        super().__init__(teacher.model, name=teacher.name)
        fast = _fast_copy(teacher.model, dtype)
        self.fast = torch.compile(fast) if compile else fast
        object.__setattr__(self, "_replay", capture(_no_grad(self.fast)) if graphs else None)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return self.model(x)
        # the recorded graph is a no-grad forward: an input that needs its gradient (an attack through the
        # teacher, AdaAD) and a call inside another graph's recording run the folded copy directly
        if self._replay is None or (x.requires_grad and torch.is_grad_enabled()) or _capturing(x):
            return self.fast(x)
        return self._replay(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, frozen, BN-folded{', CUDA graph' if self._replay is not None else ''}"


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class GraphedTransform(WrappedTransform):
    """A graph-safe transform recorded as a CUDA graph (one per input shape) and replayed.

    It attacks ``view`` (e.g. the BN-folded eval view of the student, ``refresh``-ed from the live weights
    inside the graph) whenever it is asked to attack ``bound``; any other model runs the transform eagerly.
    Settings read and written on it are the wrapped transform's; when they change (``eps``, ``steps``, ...)
    the graphs are recorded again. ``capture`` builds the replayer (a CPU test passes a fake)."""

    def __init__(self, inner: InputTransform, bound: nn.Module, view: nn.Module,
                 refresh: Callable[[], None] | None = None, capture: Callable[..., Any] = CapturedCall,
                 log: Callable[[str], None] | None = None) -> None:
        if not inner.graph_safe:
            raise ValueError(f"{inner!r} is not graph-safe (graph_safe = False): it cannot be recorded")
        super().__init__(inner)
        d = self.__dict__
        d.update(bound=bound, view=view, refresh=refresh, capture=capture, log=log)
        d["_settings"] = inner.settings()
        d["_replay"] = capture(self._run)
        d["recorded"] = 1

    def _run(self, x: Tensor, y: Tensor, reference: Tensor | None) -> Tensor:
        if self.refresh is not None:
            self.refresh()  # fold the live student weights and BN statistics (recorded in the graph)
        return self.inner(self.view, x, y, reference)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        if model is not self.bound:
            return self.inner(model, x, y, reference)
        settings = self.inner.settings()
        if settings != self._settings:
            changed = {k: v for k, v in settings.items() if self._settings.get(k) != v}
            self.__dict__.update(_settings=settings, _replay=self.capture(self._run), recorded=self.recorded + 1)
            if self.log is not None:
                self.log(f"fast path: {type(self.inner).__name__} settings changed ({changed}): recorded again")
        return self._replay(x, y, reference)

    def __repr__(self) -> str:
        return f"Graphed({self.inner!r})"


def accelerate(recipe: Recipe, precision: str = "bf16", graphs: bool = True, compile: bool = False,
               log: Callable[[str], None] | None = None, capture: Callable[..., Any] | None = None) -> list[str]:
    """Replace the recipe's components by their fast versions on CUDA (see the module docstring); returns the
    names of the components that stay eager (also logged once). On the CPU nothing changes (unless ``capture``).

    ``graphs``: record attacks and teachers as CUDA graphs (off under SyncBatchNorm, whose collectives cannot
    be recorded). ``compile``: also ``torch.compile`` the attacked student view and the teachers' copies.
    ``capture``: what records and replays a call (default :class:`CapturedCall`, a CUDA graph).
    """
    device = next(recipe.student.parameters()).device
    if device.type != "cuda" and capture is None:
        return []
    capture = capture or CapturedCall
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    teachers, transforms, eager = plan(recipe, graphs)
    fast_teachers = {id(t): FastTeacher(t, low, graphs=graphs, compile=compile, capture=capture) for t in teachers}
    folded = folded_eval(recipe.student) if transforms else None
    fast_transforms: dict[int, InputTransform] = {}
    for t in transforms:
        bound = t.model if t.model is not None else recipe.student
        bound = fast_teachers.get(id(bound), bound)  # a teacher it attacks: after the swap, its fast version
        view, refresh = bound, None
        if t.model is None and folded is not None and t.bn_mode == "eval":
            view, refresh = folded, folded.refresh
        fast_transforms[id(t)] = GraphedTransform(t, bound, torch.compile(view) if compile else view, refresh,
                                                  capture=capture, log=log)
    _swap(recipe, fast_teachers, fast_transforms)
    if eager and log is not None:
        log(f"fast path: eager: {'; '.join(eager)}")
    return eager


def plan(recipe: Recipe, graphs: bool = True) -> tuple[list[Teacher], list[InputTransform], list[str]]:
    """Which components ``accelerate`` replaces: (frozen teachers to fold, transforms to record) and the
    names of those that stay eager, with why."""
    feature_teachers = {key[1][0] for key, layers in recipe.layers.items() if key[0] == "teacher" and layers}
    teachers, transforms, eager = [], [], []
    for t in recipe.teachers:
        if t.trainable or id(t) in feature_teachers or type(t) is not Teacher:
            why = "trainable" if t.trainable else "read for its features" if id(t) in feature_teachers else \
                type(t).__name__
            eager.append(f"teacher {t.name} ({why})")
        else:
            teachers.append(t)
    seen: set[int] = set()
    for b in recipe.branches:
        for t in (b.transform, b.teacher_input):
            if t is None or _key(t) == "clean" or id(t) in seen:
                continue
            seen.add(id(t))
            if graphs and t.graph_safe:
                transforms.append(t)
            else:
                eager.append(f"transform {t!r} ({'not graph-safe' if not t.graph_safe else 'graphs off'})")
    return teachers, transforms, eager


def _swap(recipe: Recipe, teachers: dict[int, Teacher], transforms: dict[int, InputTransform]) -> None:
    """Put the fast components where the originals were: branches, transforms' own modules, the teacher list."""
    def sub(m: Any) -> Any:
        return teachers.get(id(m), m)

    for b in recipe.branches:
        b.teacher = sub(b.teacher)
        for t in (b.transform, b.teacher_input):
            if t is not None:
                for attr in ("model", "reference", "through"):
                    if getattr(t, attr, None) is not None and id(getattr(t, attr)) in teachers:
                        setattr(t, attr, sub(getattr(t, attr)))
        b.transform = transforms.get(id(b.transform), b.transform)
        if b.teacher_input is not None:
            b.teacher_input = transforms.get(id(b.teacher_input), b.teacher_input)
    recipe.teachers = nn.ModuleList([sub(t) for t in recipe.teachers])
    recipe.layers = recipe._layers()


def _fast_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    fast = fold_batchnorm(model)
    if fast is model:
        import copy

        fast = copy.deepcopy(model)
    fast.requires_grad_(False).eval()
    if dtype is not None:
        fast.to(dtype)
    return fast.to(memory_format=torch.channels_last)


def _no_grad(module: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return run


__all__ = ["CapturedCall", "FastTeacher", "FoldedEval", "GraphedTransform", "accelerate", "fold_batchnorm",
           "folded_eval", "plan"]
