"""Weight-sharing supernet training: one random subnet per step (AutoFormer) or the sandwich rule
(largest, smallest and random subnets per step, the smaller ones distilled from the largest), with
optional bilateral width slicing (ViTAS / BCNet). The subnets of a step are a pure function of
(seed, step): the same on every rank with no communication, and replayed exactly on resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitnas.space import SearchSpace, load_space
from vitnas.supernet import build_supernet
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext, register_task, soft_cross_entropy

__all__ = ["SupernetTask", "load_space", "sample_step_archs"]


def sample_step_archs(space: Any, cfg: Any, step: int, macs: Callable[[Any], float] | None = None) -> list[Any]:
    """The subnets of one step, a pure function of (seed, step): the same on every rank. With a MACs window
    (`min_mmacs` / `max_mmacs`) and `macs`, random subnets are drawn until one falls inside it (the sandwich
    rule's largest and smallest stay the space's)."""
    rng = np.random.default_rng([cfg.seed, step, 17])
    if cfg.sampling == "uniform":
        return [_sample(space, rng, cfg, macs)]
    return [space.largest(), space.smallest()] + [_sample(space, rng, cfg, macs) for _ in range(cfg.sandwich_random)]


def _sample(space: Any, rng: np.random.Generator, cfg: Any, macs: Callable[[Any], float] | None) -> Any:
    lo, hi = getattr(cfg, "min_mmacs", 0.0) * 1e6, (getattr(cfg, "max_mmacs", None) or float("inf")) * 1e6
    if macs is None or (lo <= 0 and hi == float("inf")):
        return space.sample(rng)
    for _ in range(1000):
        arch = space.sample(rng)
        if lo <= macs(arch) <= hi:
            return arch
    raise ValueError(
        f"no subnet of space {space.name!r} in the MACs window [{cfg.min_mmacs}, {cfg.max_mmacs}] M after 1000 "
        f"samples: widen min_mmacs / max_mmacs"
    )


@register_task("supernet")
class SupernetTask(Task):
    resume_keys = ("space", "sampling", "sandwich_random", "bilateral", "min_mmacs", "max_mmacs")
    best_metric = None  # a supernet is judged by the search, not by one subnet's score

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.space = load_space(cfg.space)
        if cfg.bilateral and not isinstance(self.space, SearchSpace):
            raise ValueError(f"bilateral width slicing is for ViT spaces; space {cfg.space!r} is not one")

    def img_size(self) -> int:
        return self.cfg.img_size or self.space.img_size

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        return build_supernet(
            self.space, img_size=self.img_size(), num_classes=num_classes, drop_path_rate=self.cfg.drop_path
        )

    def loss(self, batch: Batch) -> StepResult:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        archs = sample_step_archs(self.space, cfg, batch.step, model.num_macs)
        total = torch.zeros((), device=ctx.device)
        teacher = None
        side = "right" if (cfg.bilateral or getattr(self.space, "bilateral", False)) and batch.step % 2 else "left"
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
