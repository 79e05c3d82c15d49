"""Distillation: frozen teachers built from any model spec, and the distillation losses."""

from vitnas.distill.losses import KD_KINDS, hard_kd_loss, kd_loss, soft_kd_loss
from vitnas.distill.teacher import Teacher, load_teacher

__all__ = ["KD_KINDS", "Teacher", "hard_kd_loss", "kd_loss", "load_teacher", "soft_kd_loss"]
