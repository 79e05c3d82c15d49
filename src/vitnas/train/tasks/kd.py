"""Knowledge distillation from a frozen teacher (`teacher` in the config): the student is what the
wrapped task trains (an arch or a registered model); each step adds the teacher's logits on the same
augmented batch to the loss (soft KD at temperature `distill_tau`, or DeiT-style hard KD), mixed with
the label loss by `distill_alpha`."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitnas.distill.losses import KD_KINDS, kd_loss
from vitnas.distill.teacher import Teacher, load_teacher
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext

__all__ = ["KDTask"]


class KDTask(Task):
    """Wraps a task that trains one model and distils a teacher into it."""

    resume_keys = ("teacher", "teacher_weights", "teacher_dtype", "distill", "distill_alpha", "distill_tau")

    def __init__(self, cfg: Any, student: Task) -> None:
        super().__init__(cfg)
        if cfg.distill not in KD_KINDS:
            raise ValueError(f"config: distill={cfg.distill!r}; expected one of {KD_KINDS}")
        if student.best_metric is None:
            raise ValueError(f"config: teacher is for training one model; task {student.name!r} trains a supernet")
        self.student = student
        self.name = f"kd/{student.name}"
        self.resume_keys = student.resume_keys + KDTask.resume_keys
        self.best_metric = student.best_metric
        self.teacher: Teacher | None = None

    def img_size(self) -> int:
        return self.student.img_size()

    def norm_override(self) -> dict[str, Any]:
        return self.student.norm_override()

    def prepare_data(self, data: Any) -> None:
        self.student.prepare_data(data)
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
        model = self.student.build_model(ctx, num_classes)
        self.student.model, self.student.ctx = model, ctx  # the trainer moves it in place (nn.Module.to)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return self.student.param_groups(model)

    def loss(self, batch: Batch) -> StepResult:
        cfg = self.cfg
        teacher_logits = self.teacher(batch.images)
        with self.ctx.autocast():
            logits = self.model(batch.images)
        loss = kd_loss(
            logits, teacher_logits, batch.targets, kind=cfg.distill, alpha=cfg.distill_alpha, tau=cfg.distill_tau
        )
        self.ctx.backward(loss)
        return StepResult(loss.detach())

    def evaluate(self) -> dict[str, float]:
        return self.student.evaluate()

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self.student.checkpoint_meta(), "teacher": self.teacher.describe()}
