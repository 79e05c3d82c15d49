"""MiniViT weight distillation (Zhang et al., CVPR'22; microsoft/Cream MiniViT): the student that the
wrapped task trains learns a frozen teacher's logits and, at mapped layers, its q/k/v attention
relations and hidden-state relations (`vitnas.distill.relations`).

loss = (1 - distill_alpha) * CE(student, targets)
     + distill_alpha * CE(student / T, softmax(teacher / T))      (T = distill_tau, no T^2, as MiniViT)
     + distill_attn_weight * L_attn + distill_hidden_weight * L_hidden

The reference recipe is distill_alpha 1.0, distill_tau 1, distill_attn_weight 1.0, distill_hidden_weight 0.1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitnas.distill.relations import (
    LayerPair,
    capture_features,
    check_pairing,
    layout_of,
    parse_layer_pairs,
    relation_losses,
    resolve_layer_map,
)
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext, soft_cross_entropy
from vitnas.train.tasks.student import TeacherStudentTask

__all__ = ["MiniViTTask"]


class MiniViTTask(TeacherStudentTask):
    """Wraps a task that trains one model (a Mini-DeiT, or a ViT) and distils a DeiT / Mini-DeiT
    teacher into it, MiniViT style."""

    prefix = "minivit"
    resume_keys = TeacherStudentTask.resume_keys + (
        "distill",
        "distill_alpha",
        "distill_tau",
        "distill_layers",
        "distill_attn_weight",
        "distill_hidden_weight",
        "distill_relation_heads",
    )

    def __init__(self, cfg: Any, student: Task) -> None:
        if cfg.distill != "minivit":
            raise ValueError(f"config: distill={cfg.distill!r}; MiniViTTask is for distill='minivit'")
        parse_layer_pairs(cfg.distill_layers)  # the syntax now; the ranges once both models exist
        super().__init__(cfg, student)
        self.pairs: list[LayerPair] = []

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        model = super().build_model(ctx, num_classes)
        s, t = layout_of(model), layout_of(self.teacher.model)
        self.pairs = resolve_layer_map(self.cfg.distill_layers, s.layers, t.layers)
        check_pairing(s, t, self.pairs, self.cfg.distill_relation_heads)
        return model

    def loss(self, batch: Batch) -> StepResult:
        cfg, teacher = self.cfg, self.teacher
        with torch.no_grad(), capture_features(teacher.model, {t for _, t in self.pairs}) as tf:
            teacher_logits = teacher.model(batch.images.to(teacher.dtype)).float()
        with self.ctx.autocast(), capture_features(self.model, {s for s, _ in self.pairs}) as sf:
            logits = self.model(batch.images)
        attn, hidden = relation_losses(sf, tf, self.pairs, heads=cfg.distill_relation_heads)
        tau, alpha = cfg.distill_tau, cfg.distill_alpha
        label = soft_cross_entropy(logits, batch.targets)
        kd = soft_cross_entropy(logits.float() / tau, F.softmax(teacher_logits / tau, dim=-1))
        loss = (1 - alpha) * label + alpha * kd + cfg.distill_attn_weight * attn + cfg.distill_hidden_weight * hidden
        self.ctx.backward(loss)
        metrics = {"label": label, "kd": kd, "attn": attn, "hidden": hidden}
        return StepResult(loss.detach(), metrics={k: float(v.detach()) for k, v in metrics.items()})

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "distill_layers": [list(p) for p in self.pairs]}
