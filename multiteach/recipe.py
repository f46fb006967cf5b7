"""A recipe: the student, N branches (input transform, teacher, loss) and a weighter, for one step.

    for each branch i:  x_i = transform_i(student, x, y)         (shared transforms run once)
                        s_i = student(x_i);  q_i = teacher_i(x_i or its own input)
                        L_i = loss_i(s_i, q_i, y)
    w = weighter.update(L.detach());  total = sum_i w_i L_i

The trainer only sees ``recipe(x, y) -> StepOutput(total, losses, weights)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .balance import EntropyBalance
from .transforms import Clean, InputTransform
from .weighting import Fixed, Weighter


class _StudentTarget:
    """Marker: the branch's target is the student's own (differentiable) output, as in TRADES."""

    def __repr__(self) -> str:
        return "STUDENT"


STUDENT = _StudentTarget()


@dataclass
class Branch:
    """One term of the objective.

    ``transform`` makes the student's input; the teacher reads ``teacher_input`` (default: the same input,
    as in MTARD; ``Clean()`` for RSLAD and ARD, whose teacher sees the clean batch). ``teacher`` is a frozen
    :class:`~multiteach.Teacher`, :data:`STUDENT` (TRADES' self-distillation) or ``None`` (labels only).
    """

    transform: InputTransform
    loss: Callable[[Tensor, Tensor | None, Tensor], Tensor]
    teacher: nn.Module | _StudentTarget | None = None
    teacher_input: InputTransform | None = None
    name: str = ""


class StepOutput(NamedTuple):
    total: Tensor  # the loss to back-propagate
    losses: Tensor  # (N,) per-branch losses, detached
    weights: Tensor  # (N,) the weights used this step


def _key(t: InputTransform) -> Any:
    return "clean" if isinstance(t, Clean) else id(t)


def _num_classes(m: Any) -> int | None:
    n = getattr(m, "num_classes", None)
    return n if isinstance(n, int) else None


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
        self.runners: dict[int, Callable[..., Tensor]] = {}  # id(transform or teacher) -> faster stand-in
        self.loss_sync: Callable[[Tensor], Tensor] | None = None  # distributed: all-reduce mean over ranks
        teachers: list[nn.Module] = []
        extra = [t.model for b in self.branches for t in (b.transform, b.teacher_input) if t is not None]
        extra += [b.transform.reference for b in self.branches]
        for m in [b.teacher for b in self.branches] + extra:
            if isinstance(m, nn.Module) and m is not student and all(m is not t for t in teachers):
                teachers.append(m)
        self.teachers = nn.ModuleList(teachers)
        self.loss_modules = nn.ModuleList([b.loss for b in self.branches if isinstance(b.loss, nn.Module)])
        n_student = _num_classes(student)
        for t in teachers:
            n_teacher = _num_classes(t)
            if n_student and n_teacher and n_student != n_teacher:
                raise ValueError(
                    f"student has {n_student} classes but teacher {getattr(t, 'name', type(t).__name__)!r} has "
                    f"{n_teacher}: build both with the dataset's num_classes"
                )

    @property
    def branch_names(self) -> list[str]:
        return [b.name for b in self.branches]

    def forward(self, x: Tensor, y: Tensor, model: nn.Module | None = None) -> StepOutput:
        """One step's losses. ``model`` runs the student's training forwards (e.g. its DDP wrapper);
        attacks always use the bare ``self.student``."""
        model = self.student if model is None else model
        inputs: dict[Any, Tensor] = {}
        student_out: dict[Any, Tensor] = {}
        teacher_out: dict[tuple[int, Any], Tensor] = {}

        def teacher_logits(teacher: nn.Module, t: InputTransform) -> Tensor:
            key = (id(teacher), _key(t))
            if key not in teacher_out:
                with torch.no_grad():
                    teacher_out[key] = self.runners.get(id(teacher), teacher)(input_of(t))
            return teacher_out[key]

        def input_of(t: InputTransform) -> Tensor:
            key = _key(t)
            if key not in inputs:
                ref = teacher_logits(t.reference, Clean()) if t.needs_reference and t.reference else None
                runner = self.runners.get(id(t))
                if runner is not None:
                    inputs[key] = runner(x, y, ref)
                else:
                    inputs[key] = t(t.model if t.model is not None else self.student, x, y, ref)
            return inputs[key]

        def student_logits(t: InputTransform) -> Tensor:
            key = _key(t)
            if key not in student_out:
                student_out[key] = model(input_of(t))
            return student_out[key]

        for b in self.branches:  # every attack first, as the official scripts do: the student's training
            input_of(b.transform)  # forwards below update its BN statistics, which eval-mode attacks read
            if b.teacher_input is not None:
                input_of(b.teacher_input)
        outs, targets, tidx = [], [], []
        for b in self.branches:
            outs.append(student_logits(b.transform))
            t_in = b.teacher_input or b.transform
            if b.teacher is STUDENT:
                targets.append(student_logits(t_in))
            elif b.teacher is not None:
                targets.append(teacher_logits(b.teacher, t_in))
                tidx.append(len(targets) - 1)
            else:
                targets.append(None)
        if self.balance is not None:
            for i, soft in zip(tidx, self.balance([targets[i] for i in tidx], sync=self.loss_sync)):
                targets[i] = soft
        losses = torch.stack([b.loss(s, q, y).float() for b, s, q in zip(self.branches, outs, targets)])
        observed = self.sync_losses(losses.detach())
        total, weights = self.weighter.combine(losses, observed)
        return StepOutput(total, observed, weights)

    def sync_losses(self, losses: Tensor) -> Tensor:
        """The losses the weighter sees (and the logs show): under DDP their mean over ranks, i.e. the
        global batch's losses, so every rank computes the same weights."""
        return losses if self.loss_sync is None else self.loss_sync(losses)

    def on_lr(self, ratio: float) -> None:
        """Tell schedule-following components the current lr / base_lr."""
        self.weighter.on_lr(ratio)
        if self.balance is not None:
            self.balance.on_lr(ratio)

    def on_epoch_end(self) -> None:
        self.weighter.on_epoch_end()

    def component_state(self) -> dict[str, Any]:
        """State that evolves in training besides the student: weighter and balance."""
        state = {"weighter": self.weighter.state_dict()}
        if self.balance is not None:
            state["balance"] = self.balance.state_dict()
        return state

    def load_component_state(self, state: dict[str, Any]) -> None:
        self.weighter.load_state_dict(state["weighter"])
        if self.balance is not None and "balance" in state:
            self.balance.load_state_dict(state["balance"])

    def train(self, mode: bool = True) -> Recipe:
        super().train(mode)
        for t in self.teachers:  # frozen teachers (and any module used as one) stay in eval mode
            t.train(False)
        return self

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(student parameters, other trainable parameters such as uncertainty weights)."""
        own = {id(p) for p in self.student.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        return [p for p in self.student.parameters() if p.requires_grad], rest


__all__ = ["STUDENT", "Branch", "Recipe", "StepOutput"]
