"""Knowledge distillation from a frozen teacher (`teacher` in the config): the student is what the
wrapped task trains (an arch or a registered model); each step adds the teacher's logits on the same
augmented batch to the loss (soft KD at temperature `distill_tau`, or DeiT-style hard KD), mixed with
the label loss by `distill_alpha`."""

from __future__ import annotations

from typing import Any

from vitnas.distill.losses import KD_KINDS, kd_loss
from vitnas.train.tasks.base import Batch, StepResult, Task
from vitnas.train.tasks.student import TeacherStudentTask

__all__ = ["KDTask"]


class KDTask(TeacherStudentTask):
    """Wraps a task that trains one model and distils a teacher's logits into it."""

    prefix = "kd"
    resume_keys = TeacherStudentTask.resume_keys + ("distill", "distill_alpha", "distill_tau")

    def __init__(self, cfg: Any, student: Task) -> None:
        if cfg.distill not in KD_KINDS:
            raise ValueError(f"config: distill={cfg.distill!r}; expected one of {KD_KINDS} or 'minivit'")
        super().__init__(cfg, student)

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
