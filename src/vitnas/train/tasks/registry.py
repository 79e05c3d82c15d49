"""Train any registered model (`vitnas models` lists them) from scratch or from pretrained weights."""

from __future__ import annotations

import torch
from torch import nn

from vitnas.costs.macs import model_input_size
from vitnas.models.registry import create_model
from vitnas.train.tasks.base import Task, TaskContext, register_task

__all__ = ["RegistryTask"]


@register_task("registry")
class RegistryTask(Task):
    resume_keys = ("model", "model_args", "pretrained")

    def img_size(self) -> int:
        if self.cfg.img_size:
            return self.cfg.img_size
        with torch.device("meta"):  # the size the model is built for when the config names none
            return model_input_size(create_model(self.cfg.model, **self.cfg.model_args))[1]

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        kwargs = dict(img_size=self.img_size(), num_classes=num_classes, drop_path_rate=self.cfg.drop_path)
        return create_model(self.cfg.model, **{**kwargs, **self.cfg.model_args})
