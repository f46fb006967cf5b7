"""Validation and model selection: clean and PGD accuracy on the held-out split (fp32, eval mode), of the raw
student and of its weight average; the best so far by the configured score."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..distributed import DistContext
from ..evaluation import clean_and_pgd


def threat_model(recipe: Any) -> tuple[str, float]:
    """(norm, eps) of the recipe's first attack, the threat its student is trained against and validated on;
    L-inf 8/255 for a recipe without one."""
    for branch in getattr(recipe, "branches", []):
        eps = getattr(branch.transform, "eps", None)
        if isinstance(eps, (int, float)) and eps > 0:
            return str(getattr(branch.transform, "norm", "Linf")), float(eps)
    return "Linf", 8 / 255


class Validator:
    """Scores models on ``loader`` (``None``: no validation) and keeps the best (``select``: w_robust,
    robust or clean; selecting on clean accuracy runs no attack). The attack is PGD-``pgd_steps`` at the
    ``threat`` (norm, eps) the recipe trains for, step eps/4 (PGD_SAT at L-inf 8/255)."""

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]] | None, pgd_steps: int = 20,
                 select: str = "w_robust", dist: DistContext | None = None,
                 threat: tuple[str, float] = ("Linf", 8 / 255)) -> None:
        self.loader, self.pgd_steps, self.select, self.threat = loader, pgd_steps, select, threat
        self.dist = dist or DistContext()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Clean and PGD-k accuracy and W-Robust on the validation split (clean only when selecting on it)."""
        if self.loader is None:
            return {}
        steps = 0 if self.select == "clean" else self.pgd_steps
        norm, eps = self.threat
        m = clean_and_pgd(model, self.loader, steps=steps, eps=eps, dist=self.dist, norm=norm)
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


__all__ = ["Validator", "threat_model"]
