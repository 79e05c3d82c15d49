"""Train one architecture of a search space: from scratch, or fine-tuned from the weights it inherits
from a supernet checkpoint (`init_from`), on that supernet's data split and normalization."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vitnas.checkpoint import read_metadata
from vitnas.models.spec import is_supernet, load_model
from vitnas.models.vit import VisionTransformer
from vitnas.space import SearchSpace, arch_from_yaml, load_space, space_from_dict
from vitnas.supernet import build_supernet
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext, register_task

__all__ = ["ArchTask"]

log = logging.getLogger(__name__)

# Settings a fine-tune must share with its supernet, or the training split would hold validation images.
SPLIT_KEYS = ("data_path", "seed", "val_per_class")


@register_task("arch")
class ArchTask(Task):
    resume_keys = ("space", "arch", "init_from", "pretrained")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.parent = read_metadata(cfg.init_from) if cfg.init_from else None
        if self.parent is None:
            self.space = load_space(cfg.space)
            self.arch = arch_from_yaml(self.space, cfg.arch)
            return
        if not is_supernet(self.parent["model"]["kind"]):
            raise ValueError(
                f"{cfg.init_from}: init_from must be a supernet checkpoint, this one holds a "
                f"{self.parent['model']['kind']} model"
            )
        for key in SPLIT_KEYS:
            if self.parent["config"][key] != getattr(cfg, key):
                raise ValueError(
                    f"{cfg.init_from}: the supernet was trained with {key}={self.parent['config'][key]!r}, this "
                    f"run has {key}={getattr(cfg, key)!r}; they must match, or the training split would "
                    f"contain the validation images the search ranked on"
                )
        self.space = space_from_dict(self.parent["model"]["space"], source=str(cfg.init_from))
        self.arch = arch_from_yaml(self.space, cfg.arch)

    def img_size(self) -> int:
        if self.parent is not None:
            return self.parent["img_size"]
        return self.cfg.img_size or self.space.img_size

    def norm_override(self) -> dict[str, Any]:
        if self.parent is None:
            return {}
        return {"mean": self.parent["norm"]["mean"], "std": self.parent["norm"]["std"]}

    def prepare_data(self, data: Any) -> None:
        if self.parent is not None and self.parent["classes"] != data.classes:
            raise ValueError(
                f"{self.cfg.init_from}: trained on classes {self.parent['classes']}, the data has {data.classes}"
            )

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        cfg, arch = self.cfg, self.arch
        if cfg.init_from:
            supernet, _ = load_model(cfg.init_from)
            if supernet.num_classes != num_classes:
                raise ValueError(
                    f"{cfg.init_from}: supernet has {supernet.num_classes} classes, the data {num_classes}"
                )
            if hasattr(supernet, "max_depth"):  # block networks: rates rising with depth
                depth = supernet.max_depth
                supernet.drop_path_rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]
            log.info("inheriting %s from %s", arch.key(), cfg.init_from)
            model = supernet.extract(arch).train()
            if hasattr(model, "drop_path_prob"):  # cell networks (DARTS): one rate for every edge
                model.drop_path_prob = cfg.drop_path
            return model
        space = self.space
        if not isinstance(space, SearchSpace):  # other kinds: the subnet of a freshly initialised supernet
            supernet = build_supernet(
                space, img_size=self.img_size(), num_classes=num_classes, drop_path_rate=cfg.drop_path
            )
            return supernet.extract(arch).train()
        return VisionTransformer.from_arch(
            arch,
            img_size=self.img_size(),
            patch_size=space.patch_size,
            num_classes=num_classes,
            head_dim=space.head_dim,
            rel_pos_max=space.rel_pos_max,
            drop_path_rate=cfg.drop_path,
        )

    def loss(self, batch: Batch) -> StepResult:
        if hasattr(self.model, "drop_path_prob"):  # cell networks: drop path ramps up to cfg.drop_path (DARTS)
            self.model.drop_path_prob = self.cfg.drop_path * batch.epoch / max(self.cfg.epochs, 1)
        return super().loss(batch)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict()}
