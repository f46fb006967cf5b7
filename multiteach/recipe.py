"""A recipe: the student, N branches (input transform, teacher, loss) and a weighter, for one step.

    for each distinct transform t:  x_t = t(student, x, y)                (shared transforms run once)
    for each branch i:  s_i = student(x_{t_i})        (logits, or a layer's features)
                        q_i = teacher_i(x_{t_i} or its own input)      (frozen, or trainable: an online peer)
                        L_i = loss_i(s_i, q_i, y)     per sample, shape (B,)
    W = weighter(ctx)   (N,) or (N, B), from the per-sample losses, labels, outputs and epoch
    total = sum_i mean_b W_ib L_ib  (+ each trainable teacher's own loss)

The trainer only sees ``recipe(x, y) -> StepOutput(total, losses, weights)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .balance import EntropyBalance
from .features import capture
from .teachers import Teacher
from .transforms import Clean, InputTransform, as_transform
from .weighting import Fixed, StepContext, Weighter


class _StudentTarget:
    """Marker: the branch's target is the student's own (differentiable) output, as in TRADES."""

    def __repr__(self) -> str:
        return "STUDENT"


STUDENT = _StudentTarget()


@dataclass
class Branch:
    """One term of the objective.

    ``transform`` makes the student's input; the teacher reads ``teacher_input`` (default: the same input,
    as in MTARD; ``Clean()`` for RSLAD and ARD, whose teacher sees the clean batch). ``teacher`` is a
    :class:`~multiteach.Teacher` (any other module is wrapped frozen), :data:`STUDENT` (TRADES'
    self-distillation) or ``None`` (labels only). ``student_layer`` / ``teacher_layer``: compare those layers'
    features instead of the logits (a feature branch; its loss holds the projector). ``loss`` returns one
    value per sample.
    """

    transform: InputTransform
    loss: Callable[[Tensor, Tensor | None, Tensor], Tensor]
    teacher: nn.Module | _StudentTarget | None = None
    teacher_input: InputTransform | None = None
    name: str = ""
    student_layer: str | None = None
    teacher_layer: str | None = None


class StepOutput(NamedTuple):
    total: Tensor  # the loss to back-propagate
    losses: Tensor  # (N,) per-branch mean losses over the (global) batch, detached
    weights: Tensor  # (N,) the weights used this step (their batch mean for per-sample weights)


def _key(t: InputTransform) -> Any:
    return "clean" if isinstance(t, Clean) else id(t)


def _num_classes(m: Any) -> int | None:
    n = getattr(m, "num_classes", None)
    return n if isinstance(n, int) else None


class _Outputs:
    """One step's memo: each input, student output and teacher output is computed once."""

    def __init__(self, recipe: Recipe, x: Tensor, y: Tensor, model: nn.Module) -> None:
        self.recipe, self.x, self.y, self.model = recipe, x, y, model
        self.inputs: dict[Any, Tensor] = {}
        self.student: dict[Any, tuple[Tensor, dict[str, Tensor]]] = {}
        self.teacher: dict[tuple[int, Any], tuple[Tensor, dict[str, Tensor]]] = {}
        self.teacher_losses: list[Tensor] = []

    def input(self, t: InputTransform) -> Tensor:
        key = _key(t)
        if key not in self.inputs:
            ref = None
            if t.needs_reference and t.reference is not None:
                ref = self.teacher_out(t.reference, Clean())[0].detach()
            self.inputs[key] = t(t.model if t.model is not None else self.recipe.student, self.x, self.y, ref)
        return self.inputs[key]

    def student_out(self, t: InputTransform) -> tuple[Tensor, dict[str, Tensor]]:
        key = _key(t)
        if key not in self.student:
            with capture(self.recipe.student, self.recipe.layers.get(("student", key), ())) as feats:
                logits = self.model(self.input(t))
            self.student[key] = logits, dict(feats)
        return self.student[key]

    def teacher_out(self, teacher: Teacher, t: InputTransform) -> tuple[Tensor, dict[str, Tensor]]:
        key = (id(teacher), _key(t))
        if key not in self.teacher:
            layers = self.recipe.layers.get(("teacher", key), ())
            with torch.set_grad_enabled(teacher.trainable), capture(teacher.model, layers) as feats:
                logits = teacher(self.input(t))
            self.teacher[key] = logits, dict(feats)
            if teacher.trainable:  # an online peer: its own loss on this input, against the student's output
                own = teacher.loss(logits, self.student_out(t)[0].detach(), self.y)
                self.teacher_losses.append(own.float().mean())
        return self.teacher[key]


class Recipe(nn.Module):
    """Student + branches + weighter (+ an optional teacher-temperature balance); ``forward`` is one step."""

    def __init__(
        self,
        student: nn.Module,
        branches: Sequence[Branch],
        weighter: Weighter | None = None,
        balance: EntropyBalance | None = None,
        name: str = "recipe",
    ) -> None:
        super().__init__()
        if not branches:
            raise ValueError("a recipe needs at least one branch")
        self.student = student
        self.branches = list(branches)
        for i, b in enumerate(self.branches):
            b.name = b.name or f"branch{i}"
        self.weighter = weighter if weighter is not None else Fixed([1.0] * len(self.branches))
        if self.weighter.n != len(self.branches):
            raise ValueError(f"weighter is for {self.weighter.n} losses, the recipe has {len(self.branches)} branches")
        self.balance = balance
        self.name = name
        self.epoch = 0  # epochs finished; the trainer sets it (weighters with per-epoch schedules read it)
        self.loss_sync: Callable[[Tensor], Tensor] | None = None  # distributed: all-reduce mean over ranks
        self.teachers = nn.ModuleList(self._wrap_teachers())
        self.loss_modules = nn.ModuleList([b.loss for b in self.branches if isinstance(b.loss, nn.Module)])
        self.layers = self._layers()
        n_student = _num_classes(student)
        for t in self.teachers:
            n_teacher = _num_classes(t)
            if n_student and n_teacher and n_student != n_teacher:
                raise ValueError(
                    f"student has {n_student} classes but teacher {t.name!r} has {n_teacher}: build both with "
                    "the dataset's num_classes"
                )

    def _wrap_teachers(self) -> list[Teacher]:
        """Every module a branch or transform reads besides the student, as a Teacher (plain modules frozen)."""
        wrapped: dict[int, Teacher] = {}

        def wrap(m: Any) -> Any:
            if not isinstance(m, nn.Module) or m is self.student:
                return m
            if id(m) not in wrapped:
                t = m if isinstance(m, Teacher) else Teacher(m)
                wrapped[id(m)] = wrapped[id(t)] = t
            return wrapped[id(m)]

        for b in self.branches:
            b.transform = as_transform(b.transform)
            b.teacher_input = None if b.teacher_input is None else as_transform(b.teacher_input)
            b.teacher = wrap(b.teacher)
            for t in (b.transform, b.teacher_input):
                if t is not None:
                    for attr in ("model", "reference", "through"):
                        if getattr(t, attr, None) is not None:
                            setattr(t, attr, wrap(getattr(t, attr)))
        return list({id(t): t for t in wrapped.values()}.values())

    def _layers(self) -> dict[tuple[str, Any], tuple[str, ...]]:
        """Which layers to capture on each (model, input) forward, for the feature branches."""
        layers: dict[tuple[str, Any], tuple[str, ...]] = {}
        for b in self.branches:
            layers.setdefault(("student", _key(b.transform)), ())
            if b.student_layer is not None:
                layers["student", _key(b.transform)] += (b.student_layer,)
            if b.teacher_layer is not None:
                if not isinstance(b.teacher, Teacher):
                    raise ValueError(f"branch {b.name!r} reads teacher_layer {b.teacher_layer!r} but has no teacher")
                key = ("teacher", (id(b.teacher), _key(b.teacher_input or b.transform)))
                layers[key] = layers.get(key, ()) + (b.teacher_layer,)
        return layers

    @property
    def branch_names(self) -> list[str]:
        return [b.name for b in self.branches]

    @property
    def logit_target_names(self) -> list[str]:
        """The branches whose target is a teacher's logits (not a layer's features nor the student's own
        output): what a balance receives, in its order."""
        return [b.name for b in self.branches if _logit_target(b)]

    def temperatures(self) -> dict[str, float]:
        """Each softened teacher's temperature now (B-MTARD's T_k), by branch: a balance of n temperatures
        softens the first n logit targets (CIARD's leaves its third as it is); empty without a balance."""
        if self.balance is None:
            return {}
        temps = self.balance.temperatures.tolist()
        return dict(zip(self.logit_target_names[:len(temps)], temps, strict=True))

    @property
    def trainable_teachers(self) -> list[Teacher]:
        return [t for t in self.teachers if t.trainable]

    def forward(self, x: Tensor, y: Tensor, model: nn.Module | None = None) -> StepOutput:
        """One step's losses. ``model`` runs the student's training forwards (e.g. its DDP wrapper);
        attacks always use the bare ``self.student``."""
        out = _Outputs(self, x, y, self.student if model is None else model)
        for b in self.branches:  # every attack first, as the official scripts do: the student's training
            out.input(b.transform)  # forwards below update its BN statistics, which eval-mode attacks read
            if b.teacher_input is not None:
                out.input(b.teacher_input)
        students, targets, logit_targets = [], [], []
        for b in self.branches:
            logits, feats = out.student_out(b.transform)
            students.append(feats[b.student_layer] if b.student_layer else logits)
            t_in = b.teacher_input or b.transform
            if b.teacher is STUDENT:
                targets.append(out.student_out(t_in)[0])
            elif b.teacher is not None:
                q, q_feats = out.teacher_out(b.teacher, t_in)
                targets.append(q_feats[b.teacher_layer] if b.teacher_layer else q)
                if b.teacher.trainable:
                    targets[-1] = targets[-1].detach()
                if _logit_target(b):
                    logit_targets.append(len(targets) - 1)
            else:
                targets.append(None)
        if self.balance is not None:
            soft = self.balance([targets[i] for i in logit_targets], sync=self.loss_sync)
            for i, s in zip(logit_targets, soft):
                targets[i] = s
        losses = torch.stack([_per_sample(b, b.loss(s, q, y), len(y)) for b, s, q in zip(self.branches, students,
                                                                                           targets)])
        ctx = StepContext(losses.detach(), y, [s.detach() for s in students],
                          [None if q is None else q.detach() for q in targets], self.epoch, self.loss_sync)
        total, weights = self.weighter.combine(losses, ctx)
        for own in out.teacher_losses:
            total = total + own
        return StepOutput(total, ctx.batch_losses(), weights)

    def sync_losses(self, losses: Tensor) -> Tensor:
        """The losses the weighter sees (and the logs show): under DDP their mean over ranks."""
        return losses if self.loss_sync is None else self.loss_sync(losses)

    def on_lr(self, ratio: float) -> None:
        """Tell schedule-following components the current lr / base_lr."""
        self.weighter.on_lr(ratio)
        if self.balance is not None:
            self.balance.on_lr(ratio)

    def on_epoch_end(self) -> None:
        """Per-epoch state moves on: the weighter's, and any loss module's with an ``on_epoch_end`` (per-class
        temperatures or weights accumulated over the epoch; they all-reduce with :func:`epoch_sum` under DDP)."""
        self.weighter.on_epoch_end()
        for m in self.loss_modules:
            hook = getattr(m, "on_epoch_end", None)
            if callable(hook):
                hook()

    def component_state(self) -> dict[str, Any]:
        """State that evolves in training besides the student: weighter, balance, loss modules (projectors)
        and trainable teachers."""
        state: dict[str, Any] = {"weighter": self.weighter.state_dict(), "losses": self.loss_modules.state_dict(),
                                 "teachers": [t.state_dict() for t in self.trainable_teachers]}
        if self.balance is not None:
            state["balance"] = self.balance.state_dict()
        return state

    def load_component_state(self, state: dict[str, Any]) -> None:
        self.weighter.load_state_dict(state["weighter"])
        if "losses" in state:
            self.loss_modules.load_state_dict(state["losses"])
        for t, s in zip(self.trainable_teachers, state.get("teachers", [])):
            t.load_state_dict(s)
        if self.balance is not None and "balance" in state:
            self.balance.load_state_dict(state["balance"])

    def train(self, mode: bool = True) -> Recipe:
        super().train(mode)
        for t in self.teachers:  # frozen teachers stay in eval mode; trainable ones follow
            t.train(mode)
        return self

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(student parameters, other parameters the student's optimizer trains: uncertainty weights,
        projectors). Trainable teachers' parameters are theirs, for their own optimizers."""
        skip = {id(p) for p in self.student.parameters()}
        skip |= {id(p) for t in self.teachers for p in t.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        return [p for p in self.student.parameters() if p.requires_grad], rest


def _logit_target(b: Branch) -> bool:
    """Whether this branch's target is a teacher's logits (not the student's, not features): what a balance gets."""
    return b.teacher is not None and b.teacher is not STUDENT and not b.teacher_layer and not b.student_layer


def epoch_sum(t: Tensor) -> Tensor:
    """``t`` summed over the DDP ranks (as it is without DDP): for per-class statistics a component gathers
    over an epoch and turns into state in ``on_epoch_end``, so every rank holds the same state."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _per_sample(branch: Branch, loss: Tensor, batch: int) -> Tensor:
    """A branch loss as (B,) float32; a scalar (a loss written before the per-sample contract) counts as
    every sample's value."""
    loss = loss.float()
    if loss.dim() == 0:
        return loss.expand(batch)
    if loss.shape != (batch,):
        raise ValueError(f"branch {branch.name!r}: its loss returned shape {tuple(loss.shape)}; a loss returns one "
                         f"value per sample, shape ({batch},)")
    return loss


__all__ = ["STUDENT", "Branch", "Recipe", "StepOutput", "epoch_sum"]
