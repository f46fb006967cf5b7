"""The engine: the training loop and its collaborators, one job each (see ``loop.py``)."""

from .checkpointer import Checkpointer, ConfigMismatchError
from .loop import NonFiniteLossError, Trainer, TrainResult
from .runlog import RunLog
from .validator import Validator

__all__ = ["Checkpointer", "ConfigMismatchError", "NonFiniteLossError", "RunLog", "TrainResult", "Trainer",
           "Validator"]
