"""Training: a model-agnostic trainer, the tasks it trains (one file per method), checkpoints and resume."""

from vitnas.checkpoint import read_checkpoint, save_checkpoint
from vitnas.models.spec import load_model
from vitnas.train.config import TrainConfig
from vitnas.train.tasks import Task, register_task
from vitnas.train.trainer import StepInfo, Trainer, TrainingDiverged

__all__ = [
    "StepInfo",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_model",
    "read_checkpoint",
    "register_task",
    "save_checkpoint",
]
