"""Training tasks, one file per method; importing this package registers them all."""

from vitnas.train.tasks.arch import ArchTask
from vitnas.train.tasks.base import (
    Batch,
    StepResult,
    Task,
    TaskContext,
    register_task,
    soft_cross_entropy,
    task_class,
    task_names,
)
from vitnas.train.tasks.cdarts import CDARTSTask, DartsTask
from vitnas.train.tasks.clip import ClipTask, TinyClipTask
from vitnas.train.tasks.cream import CreamTask
from vitnas.train.tasks.kd import KDTask
from vitnas.train.tasks.minivit import MiniViTTask
from vitnas.train.tasks.registry import RegistryTask
from vitnas.train.tasks.stored_logits import StoredLogitsTask
from vitnas.train.tasks.supernet import SupernetTask, sample_step_archs

__all__ = [
    "ArchTask",
    "Batch",
    "CDARTSTask",
    "ClipTask",
    "CreamTask",
    "DartsTask",
    "KDTask",
    "MiniViTTask",
    "RegistryTask",
    "StepResult",
    "StoredLogitsTask",
    "SupernetTask",
    "Task",
    "TaskContext",
    "TinyClipTask",
    "register_task",
    "resolve_task",
    "sample_step_archs",
    "soft_cross_entropy",
    "task_class",
    "task_names",
]


def resolve_task(cfg) -> Task:
    """The task `cfg.task` names. "subnet" (the name configs have always used for retraining) means
    "registry" when `model` is set and "arch" otherwise. That task's model is the student of a
    StoredLogitsTask with `distill_logits` set (a `teacher` then only names the store's teacher, checked),
    else of a MiniViTTask (`distill: minivit`) or a KDTask with `teacher` set."""
    name = cfg.task
    if name == "subnet":
        name = "registry" if cfg.model else "arch"
    task = task_class(name)(cfg)
    if task.owns_teacher:
        return task
    if cfg.distill_logits:
        return StoredLogitsTask(cfg, task)
    if cfg.teacher and cfg.distill == "minivit":
        return MiniViTTask(cfg, task)
    if cfg.teacher:
        return KDTask(cfg, task)
    return task
