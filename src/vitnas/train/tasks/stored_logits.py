"""Distillation from stored teacher logits (TinyViT's fast distillation; `distill_logits` in the config).

The store (`vitnas save-logits`) holds, per training image and epoch, the seed of the augmentation the
teacher saw and the teacher's top-K probabilities. This task replays each image's augmentation from
its stored seed (so the student sees the teacher's exact image, in any batch, on any number of ranks),
rebuilds TinyViT's dense target (top-K, the rest spread evenly) and trains on soft cross-entropy
against it, mixed with the label loss by `distill_alpha` (1.0 is TinyViT's recipe). No teacher runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitnas.data.augment import AugmentConfig
from vitnas.data.replay import ReplayAugment, mix_partners, replay_from_split
from vitnas.distill.logit_store import LogitStore, dense_targets
from vitnas.distill.teacher import file_digest
from vitnas.train.tasks.base import Augment, Batch, StepResult, Task, soft_cross_entropy
from vitnas.train.tasks.student import StudentTask

__all__ = ["StoredLogitsTask"]


class StoredLogitsTask(StudentTask):
    """Wraps a task that trains one model; its targets come from a logit store."""

    prefix = "stored-logits"
    what = "distill_logits"
    resume_keys = ("distill_logits", "reuse_epochs", "distill_alpha")

    def __init__(self, cfg: Any, student: Task) -> None:
        super().__init__(cfg, student)
        self.store = LogitStore(cfg.distill_logits)
        self.data: Any = None
        self._partners: tuple[int, np.ndarray] | None = None  # (stored epoch, each image's mixing partner)

    def store_epoch(self, epoch: int) -> int:
        """The stored epoch that training epoch `epoch` reads (cycled with reuse_epochs)."""
        return epoch % self.store.epochs if self.cfg.reuse_epochs else epoch

    def prepare_data(self, data: Any) -> None:
        super().prepare_data(data)
        self.data = data
        cfg, store, m = self.cfg, self.store, self.store.manifest
        store.check({"num_classes": data.num_classes, "img_size": self.img_size()})
        if m["data"]["digest"] != data.train.digest():
            raise ValueError(
                f"{store.root}: the store covers other training images (data {m['data']['name']!r}, "
                f"{m['data']['images']} images, split val_per_class={m['split']['val_per_class']} seed="
                f"{m['split']['seed']}); this run has {data.name!r}, {len(data.train)} images, val_per_class="
                f"{cfg.val_per_class} seed={cfg.seed}"
            )
        if store.epochs == 0:
            raise ValueError(f"{store.root}: no complete epoch stored yet (finish vitnas save-logits)")
        if cfg.epochs > store.epochs and not cfg.reuse_epochs:
            raise ValueError(
                f"{store.root}: epochs={store.epochs} stored, this run trains epochs={cfg.epochs}; store more "
                f"epochs or pass --reuse-epochs to cycle the stored ones"
            )
        if cfg.teacher:
            self._check_claimed_teacher()

    def _check_claimed_teacher(self) -> None:
        cfg, stored = self.cfg, self.store.manifest["teacher"]
        weights = cfg.teacher if Path(cfg.teacher).exists() else cfg.teacher_weights
        if not weights or file_digest(weights) != stored["digest"]:
            raise ValueError(
                f"{self.store.root}: the store was made by teacher {stored['source']} (sha256 "
                f"{stored['digest'][:12]}...), not by teacher={cfg.teacher!r} as this run claims"
            )

    def build_augment(self, cfg: AugmentConfig, img_size: int, num_classes: int) -> Augment:
        if cfg.repeats > 1:
            raise ValueError(f"augment repeats={cfg.repeats}: a store holds one record per image and epoch; use 1")
        self.store.check({"augment": cfg.to_dict()}, what="this run's recipe")
        aug = ReplayAugment(cfg, img_size, num_classes)
        seed, n = int(self.store.manifest["seed"]), self.store.num_samples

        def replay(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray | None, epoch: int):
            if index is None:
                raise ValueError("stored logits are looked up by image: train_step needs the batch's dataset indices")
            e = self.store_epoch(epoch)
            seeds = self.store.seeds(e, index)
            partners = partner_seeds = None
            if aug.mixes:
                if self._partners is None or self._partners[0] != e:  # one permutation per epoch, not per step
                    self._partners = (e, mix_partners(seed, e, n))
                partners = self._partners[1][index]
                partner_seeds = self.store.seeds(e, partners)
            return replay_from_split(aug, self.data.train, index, images, labels, seeds, partners, partner_seeds)

        return replay

    def teacher_targets(self, batch: Batch) -> torch.Tensor:
        """The dense teacher distribution of the batch's images (a memory-mapped lookup by image)."""
        if batch.index is None:
            raise ValueError("stored logits are looked up by image: the batch has no dataset indices")
        _, top_idx, top_val = self.store.lookup(self.store_epoch(batch.epoch), batch.index)
        return dense_targets(top_idx, top_val, self.store.num_classes).to(batch.images.device)

    def loss(self, batch: Batch) -> StepResult:
        alpha = self.cfg.distill_alpha
        target = self.teacher_targets(batch)
        with self.ctx.autocast():
            logits = self.model(batch.images)
        loss = alpha * soft_cross_entropy(logits, target)
        if alpha < 1:
            loss = loss + (1 - alpha) * soft_cross_entropy(logits, batch.targets)
        self.ctx.backward(loss)
        return StepResult(loss.detach())

    def checkpoint_meta(self) -> dict[str, Any]:
        m = self.store.manifest
        store = {"path": str(self.store.root), "teacher": m["teacher"], "topk": m["topk"], "epochs": self.store.epochs}
        return {**super().checkpoint_meta(), "distill_logits": store}
