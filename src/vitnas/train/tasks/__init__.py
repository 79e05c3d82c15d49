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
from vitnas.train.tasks.kd import KDTask
from vitnas.train.tasks.registry import RegistryTask
from vitnas.train.tasks.supernet import SupernetTask, sample_step_archs

__all__ = [
    "ArchTask",
    "Batch",
    "KDTask",
    "RegistryTask",
    "StepResult",
    "SupernetTask",
    "Task",
    "TaskContext",
    "register_task",
    "resolve_task",
    "sample_step_archs",
    "soft_cross_entropy",
    "task_class",
    "task_names",
]


def resolve_task(cfg) -> Task:
    """The task `cfg.task` names. "subnet" (the name configs have always used for retraining) means
    "registry" when `model` is set and "arch" otherwise. With `teacher` set, that task's model is the
    student of a KDTask."""
    name = cfg.task
    if name == "subnet":
        name = "registry" if cfg.model else "arch"
    task = task_class(name)(cfg)
    if cfg.teacher:
        task = KDTask(cfg, task)
    return task
