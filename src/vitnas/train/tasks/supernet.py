"""Weight-sharing supernet training: one random subnet per step (AutoFormer) or the sandwich rule
(largest, smallest and random subnets per step, the smaller ones distilled from the largest), with
optional bilateral width slicing (ViTAS / BCNet). The subnets of a step are a pure function of
(seed, step): the same on every rank with no communication, and replayed exactly on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace
from vitnas.supernet.vit import ViTSupernet
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext, register_task, soft_cross_entropy

__all__ = ["SupernetTask", "load_space", "sample_step_archs"]


def load_space(name_or_path: str) -> SearchSpace:
    """A preset name or a space YAML."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        return SearchSpace.from_yaml(name_or_path)
    return SearchSpace.preset(name_or_path)


def sample_step_archs(space: SearchSpace, cfg: Any, step: int) -> list[ArchConfig]:
    """The subnets of one step, a pure function of (seed, step): the same on every rank."""
    rng = np.random.default_rng([cfg.seed, step, 17])
    if cfg.sampling == "uniform":
        return [space.sample(rng)]
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.sandwich_random)]


@register_task("supernet")
class SupernetTask(Task):
    resume_keys = ("space", "sampling", "sandwich_random", "bilateral")
    best_metric = None  # a supernet is judged by the search, not by one subnet's score

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.space = load_space(cfg.space)

    def img_size(self) -> int:
        return self.cfg.img_size or self.space.img_size

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        return ViTSupernet(
            self.space, img_size=self.img_size(), num_classes=num_classes, drop_path_rate=self.cfg.drop_path
        )

    def loss(self, batch: Batch) -> StepResult:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        archs = sample_step_archs(self.space, cfg, batch.step)
        total = torch.zeros((), device=ctx.device)
        teacher = None
        side = "right" if (cfg.bilateral or self.space.bilateral) and batch.step % 2 else "left"
        for i, arch in enumerate(archs):
            model.set_active(arch, side)
            with ctx.autocast():
                logits = model(batch.images)
                use_kd = cfg.sampling == "sandwich" and cfg.inplace_distill and i > 0
                loss = soft_cross_entropy(logits, teacher if use_kd else batch.targets)
            if cfg.sampling == "sandwich" and i == 0:
                teacher = F.softmax(logits.detach().float(), dim=-1)
            ctx.backward(loss / len(archs))
            total += loss.detach() / len(archs)
        return StepResult(total, archs=archs)

    def evaluate(self) -> dict[str, float]:
        """Validation top-1 of the largest and the smallest subnet."""
        out = {}
        for name, arch in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
            out[f"val_top1_{name}"] = self.ctx.evaluate(self.model, arch=arch)["top1"]
        return out
