"""Training: a model-agnostic trainer with supernet and subnet tasks, checkpoints and resume."""

from vitnas.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from vitnas.train.config import TrainConfig
from vitnas.train.trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "load_model", "read_checkpoint", "save_checkpoint"]
