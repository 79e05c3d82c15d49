"""Distillation tasks wrap the task that trains the student (an arch or a registered model) and change
only where the targets come from: these bases hand everything else through to it."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitnas.distill.teacher import Teacher, load_teacher
from vitnas.train.tasks.base import Task, TaskContext

__all__ = ["StudentTask", "TeacherStudentTask"]


class StudentTask(Task):
    """`student` builds, evaluates and checkpoints the model; subclasses write `loss`. `name` becomes
    "<prefix>/<student's name>", and the resume keys add the subclass's to the student's."""

    prefix = "student"
    what = "distillation"  # the setting, for errors

    def __init__(self, cfg: Any, student: Task) -> None:
        super().__init__(cfg)
        if student.best_metric is None:
            raise ValueError(f"config: {self.what} is for training one model; task {student.name!r} trains a supernet")
        self.student = student
        self.name = f"{self.prefix}/{student.name}"
        self.resume_keys = student.resume_keys + type(self).resume_keys
        self.best_metric = student.best_metric

    def img_size(self) -> int:
        return self.student.img_size()

    def norm_override(self) -> dict[str, Any]:
        return self.student.norm_override()

    def prepare_data(self, data: Any) -> None:
        self.student.prepare_data(data)

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        model = self.student.build_model(ctx, num_classes)
        self.student.model, self.student.ctx = model, ctx  # the trainer moves it in place (nn.Module.to)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return self.student.param_groups(model)

    def evaluate(self) -> dict[str, float]:
        return self.student.evaluate()

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.student.checkpoint_meta()


class TeacherStudentTask(StudentTask):
    """A StudentTask with a live frozen teacher (`teacher`, `teacher_weights`, `teacher_dtype`), checked
    to predict the data's classes at the student's resolution and recorded in every checkpoint."""

    what = "teacher"
    resume_keys = ("teacher", "teacher_weights", "teacher_dtype")

    def __init__(self, cfg: Any, student: Task) -> None:
        super().__init__(cfg, student)
        self.teacher: Teacher | None = None

    def prepare_data(self, data: Any) -> None:
        super().prepare_data(data)
        cfg = self.cfg
        self.teacher = load_teacher(
            cfg.teacher,
            weights=cfg.teacher_weights,
            num_classes=data.num_classes,
            img_size=self.img_size(),
            dtype=cfg.teacher_dtype,
        )
        self.teacher.check_fits(num_classes=data.num_classes, img_size=self.img_size(), student="the student")

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        self.teacher.to(ctx.device)
        return super().build_model(ctx, num_classes)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "teacher": self.teacher.describe()}
