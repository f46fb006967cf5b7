"""Validation and model selection: clean and PGD accuracy on the held-out split (fp32, eval mode), of the raw
student and of its weight average; the best so far by the configured score."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..distributed import DistContext
from ..evaluation import clean_and_pgd


class Validator:
    """Scores models on ``loader`` (``None``: no validation) and keeps the best (``select``: w_robust,
    robust or clean; selecting on clean accuracy runs no attack)."""

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]] | None, pgd_steps: int = 20,
                 select: str = "w_robust", dist: DistContext | None = None) -> None:
        self.loader, self.pgd_steps, self.select = loader, pgd_steps, select
        self.dist = dist or DistContext()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Clean and PGD-k accuracy and W-Robust on the validation split (clean only when selecting on it)."""
        if self.loader is None:
            return {}
        steps = 0 if self.select == "clean" else self.pgd_steps
        m = clean_and_pgd(model, self.loader, steps=steps, dist=self.dist)
        if "robust" in m:
            m["w_robust"] = (m["clean"] + m["robust"]) / 2
        return m

    def score(self, metrics: dict[str, float]) -> float:
        return metrics.get(self.select, 0.0)

    def validate(self, candidates: dict[str, torch.nn.Module], best: dict[str, Any], epoch: int,
                 record: dict[str, Any]) -> tuple[dict[str, Any], torch.nn.Module | None]:
        """Evaluate each candidate (``raw``, ``ema``), write ``val_*`` / ``val_ema_*`` into ``record``; returns
        the new best (epoch, score, which weights, metrics) and the model that set it, if one beat ``best``."""
        new_best = None
        for tag, model in candidates.items():
            metrics = self.evaluate(model)
            prefix = "val_" if tag == "raw" else f"val_{tag}_"
            record.update({f"{prefix}{k}": v for k, v in metrics.items()})
            if metrics and self.score(metrics) > best.get("score", -1.0):
                best = {"epoch": epoch, "score": self.score(metrics), "weights": tag, **metrics}
                new_best = model
        return best, new_best


__all__ = ["Validator"]
