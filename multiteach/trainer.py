"""The trainer (``multiteach.engine``), under its historical import path."""

from .engine import ConfigMismatchError, NonFiniteLossError, Trainer, TrainResult

__all__ = ["ConfigMismatchError", "NonFiniteLossError", "TrainResult", "Trainer"]
