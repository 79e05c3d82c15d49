"""Gradient-based cell search on the DARTS space: first-order DARTS (`task: darts`) and CDARTS (`task: cdarts`).

Both hold out `arch_fraction` of the training images (seeded; the reference splits CIFAR's training set
50/50) for the architecture weights α, which Adam updates (lr 6e-4, betas (0.5, 0.999), weight decay 1e-3).

- DARTS (first order): each step, α descends the search network's label loss on a held-out batch (the
  network's weights detached from that step), then the weights descend the loss on a training batch with α
  detached. α gets gradient from the held-out loss only.
- CDARTS: a second network, the evaluation network, runs the genotype α derives (the space's `layers` at the
  search width, weights kept in a pool over all ops). After `pretrain_epochs` of search-network warm-up the
  run cycles: the evaluation network takes the genotype α derives now and trains alone on held-out batches
  for `eval_warmup_epochs`, then `cycle_epochs` of search steps follow. A search step: on a held-out batch
  `(CE_search + CE_eval) / a + a * T^2 * KL(ens_search / T || ens_eval / T)` updates α and the evaluation
  network (the reference's "introspective distillation", both networks receive the KL gradient), where
  `ens` concatenates the two distillation heads' and the classifier's logits, each times 1/3; then the search
  network's weights take a label step on a training batch. a = 1, T = 2 (the reference's defaults).

Where this differs from the reference (microsoft/Cream `CDARTS/`), on purpose:
- One α pair (normal, reduce) for all stages: the reference keeps one per stage but derives every stage's
  genotype from stage 0's (`generate_genotype(0)`), so the others never matter.
- The whole network is searched at once; the reference can also search stage by stage, fixing earlier
  stages to their genotype.
- The networks own their stems (the reference shares one); the distillation heads are shared, as there.
- The cycle runs: with the reference's defaults (`search_iter = pretrain_epochs = 5`) every iteration is
  warm-up and no search happens (REFERENCE-methods.md, bug 15). The search network's lr follows the trainer's
  cosine schedule (the reference builds one and never steps it, bug 14); the evaluation network's SGD lr is
  constant there and here.
- The pool is the evaluation network itself: ops a genotype leaves out keep their weights, so there is no
  copy to and from a pool that skips an edge after an identity (bug 16).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitnas._config import check_fields, check_range, from_known_keys
from vitnas.space import load_space
from vitnas.space.darts import DartsSpace, Genotype
from vitnas.supernet.darts import CDARTSSupernet, DartsSupernet
from vitnas.train.tasks.base import Batch, StepResult, Task, TaskContext, register_task, soft_cross_entropy

__all__ = ["CDARTSTask", "DartsSearchConfig", "DartsTask", "cdarts_step_loss"]

log = logging.getLogger(__name__)


@dataclass
class DartsSearchConfig:
    arch_fraction: float = 0.5  # training images held out for α (and CDARTS's evaluation network)
    pretrain_epochs: int = 5  # epochs training only the search network's weights (reference pretrain_epochs 5)
    eval_warmup_epochs: int = 5  # cdarts: epochs the evaluation network trains alone on a new genotype (nasnet_warmup)
    cycle_epochs: int = 5  # cdarts: search epochs before the evaluation network takes the next genotype
    alpha_lr: float = 6e-4
    alpha_weight_decay: float = 1e-3
    eval_lr: float = 0.1  # cdarts: the evaluation network's SGD lr (reference nasnet_lr; constant)
    eval_weight_decay: float = 3e-4
    loss_alpha: float = 1.0  # cdarts: a in (CE_s + CE_e) / a + a * T^2 * KL
    temperature: float = 2.0  # cdarts: T of the KL between the two networks
    clip: float = 5.0  # gradient-norm clip of the α / evaluation-network step

    def __post_init__(self) -> None:
        source = "darts"
        check_fields(self, source)
        check_range(source, "arch_fraction", self.arch_fraction, 0.0, 1.0, strict_lo=True)
        for name in ("pretrain_epochs", "eval_warmup_epochs"):
            check_range(source, name, getattr(self, name), 0)
        check_range(source, "cycle_epochs", self.cycle_epochs, 1)
        for name in ("alpha_lr", "alpha_weight_decay", "eval_lr", "eval_weight_decay", "loss_alpha", "temperature"):
            check_range(source, name, getattr(self, name), 0.0)
        check_range(source, "clip", self.clip, 0.0, strict_lo=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DartsSearchConfig:
        return from_known_keys(cls, data, "darts")


def cdarts_step_loss(
    model: CDARTSSupernet, images: torch.Tensor, labels: torch.Tensor, *, loss_alpha: float, temperature: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """CDARTS's held-out loss: both networks' label losses and the KL of the search network's ensemble from
    the evaluation network's ('mean' over all elements, as `nn.KLDivLoss()`), neither side detached."""
    logits_s, ens_s = model.ensemble(model.search, images)
    logits_e, ens_e = model.ensemble(model.evalnet, images)
    ce = (F.cross_entropy(logits_s.float(), labels) + F.cross_entropy(logits_e.float(), labels)) / loss_alpha
    t = temperature
    # elementwise then averaged: nn.KLDivLoss()'s 'mean' over batch x classes
    kl = F.kl_div(F.log_softmax(ens_s.float() / t, dim=1), F.softmax(ens_e.float() / t, dim=1), reduction="none").mean()
    kd = loss_alpha * t * t * kl
    return ce + kd, {"ce_pair": float(ce.detach()), "kd": float(kd.detach())}


class _GradientSearch(Task):
    """What DARTS and CDARTS share: the space, the held-out split, α's optimizer, α's history."""

    resume_keys = ("space", "darts", "optimizer", "momentum")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.space = load_space(cfg.space)
        if not isinstance(self.space, DartsSpace):
            raise ValueError(
                f"task {self.name!r} searches a DARTS space (e.g. darts-small); space={cfg.space!r} is not"
            )
        self.darts = DartsSearchConfig.from_dict(cfg.darts)
        self.arch_split = None
        self.alpha_opt: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []  # per evaluation: epoch, softmax(α), genotype
        self.epoch = 0

    def img_size(self) -> int:
        return self.cfg.img_size or self.space.img_size

    def prepare_data(self, data: Any) -> Any:
        """Split the training images (seeded) into the weights' part, returned to the trainer, and α's part."""
        n = len(data.train)
        order = np.random.default_rng([self.cfg.seed, 2023]).permutation(n)
        k = int(round(n * self.darts.arch_fraction))
        if not 0 < k < n:
            raise ValueError(f"darts: arch_fraction {self.darts.arch_fraction} leaves no images on one side of {n}")
        self.arch_split = data.train.subset(np.sort(order[:k]))
        log.info("architecture split: %d held-out images, %d for the weights", k, n - k)
        return dataclasses.replace(data, train=data.train.subset(np.sort(order[k:])))

    def build_augment(self, cfg: Any, img_size: int, num_classes: int) -> Any:
        self._augment = super().build_augment(cfg, img_size, num_classes)
        return self._augment

    def _search_net(self) -> DartsSupernet:
        raise NotImplementedError

    def _main_params(self) -> list[nn.Parameter]:
        return self._search_net().weight_parameters()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The base task's decay / no-decay groups, restricted to the weights the main optimizer trains."""
        keep = {id(p) for p in self._main_params()}
        return [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in super().param_groups(model)]

    def extra_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        d = self.darts
        self.alpha_opt = torch.optim.Adam(
            self._search_net().arch_parameters(), lr=d.alpha_lr, betas=(0.5, 0.999), weight_decay=d.alpha_weight_decay
        )
        return {"alpha": self.alpha_opt}

    # -- step pieces -------------------------------------------------------------------------------
    def _arch_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A held-out batch as large as the training batch, drawn from the step's seeded RNG (per rank)."""
        n = len(self.arch_split)
        idx = torch.randperm(n)[: batch.images.shape[0]].sort().values.numpy()
        images, labels = self.arch_split.take(idx)
        labels = labels.to(self.ctx.device)
        x, _ = self._augment(images.to(self.ctx.device), labels, None, batch.epoch)
        return x, labels

    def _own_step(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        """Backpropagate `loss`, average and clip the gradients of `optimizers`' parameters, step them, and
        drop every gradient the model holds (the weights' step that follows starts clean)."""
        loss.backward()
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.ctx.all_reduce_mean([p.grad for p in params])
        nn.utils.clip_grad_norm_(params, self.darts.clip)
        for opt in optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def _weights_step(self, batch: Batch) -> torch.Tensor:
        """The search network's weights on a training batch, α detached (so α learns from held-out data only)."""
        with self.ctx.autocast():
            loss = soft_cross_entropy(self._search_net()(batch.images, detach_alpha=True), batch.targets)
        self.ctx.backward(loss)
        return loss.detach()

    # -- evaluation, history, checkpoints ----------------------------------------------------------------
    def genotype(self) -> Genotype:
        return self._search_net().genotype()

    def _record(self) -> None:
        net = self._search_net()
        self.history.append({"epoch": self.epoch, "alpha": net.alpha_probs(), "genotype": net.genotype().to_str()})

    def write_reports(self, out_dir: Any) -> None:
        """alpha.png (softmax(α) per edge over the epochs), cells.png (the derived cells), genotype.yaml."""
        from pathlib import Path

        from vitnas.report import plot_alpha_history, plot_cells

        out = Path(out_dir)
        genotype = self.genotype()
        genotype.to_yaml(out / "genotype.yaml")
        plot_cells(genotype, out / "cells.png")
        if self.history:
            plot_alpha_history(self.history, out / "alpha.png", (*self.space.ops, "none"))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"darts": {"genotype": self.genotype().to_str(), "history": self.history}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.history = list(meta.get("darts", {}).get("history", []))


@register_task("darts")
class DartsTask(_GradientSearch):
    """First-order DARTS on the space's search network."""

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        return DartsSupernet(self.space, img_size=self.img_size(), num_classes=num_classes, role="search")

    def _search_net(self) -> DartsSupernet:
        return self.model

    def loss(self, batch: Batch) -> StepResult:
        self.epoch = batch.epoch
        metrics = {}
        if batch.epoch >= self.darts.pretrain_epochs:
            x, y = self._arch_batch(batch)
            with self.ctx.autocast():
                arch_loss = F.cross_entropy(self.model(x).float(), y)
            self._own_step(arch_loss, [self.alpha_opt])
            metrics["arch_loss"] = float(arch_loss.detach())
        return StepResult(self._weights_step(batch), metrics=metrics)

    def evaluate(self) -> dict[str, float]:
        self._record()
        r = self.ctx.evaluate(self.model)  # the search network, every edge mixed
        return {"val_top1": r["top1"], "val_loss": r["loss"]}


@register_task("cdarts")
class CDARTSTask(_GradientSearch):
    """CDARTS: the search and evaluation networks in a cycle with introspective distillation."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.eval_opt: torch.optim.Optimizer | None = None
        self.cycle_start = -1  # the epoch whose first step last handed the evaluation network a genotype

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        model = CDARTSSupernet(
            self.space, img_size=self.img_size(), num_classes=num_classes, drop_path_rate=self.cfg.drop_path
        )
        model.set_active(model.search.genotype())  # the reference starts from the random α's genotype
        return model

    def _search_net(self) -> DartsSupernet:
        return self.model.search

    def _main_params(self) -> list[nn.Parameter]:
        heads = [*self.model.distill_head1.parameters(), *self.model.distill_head2.parameters()]
        return self.model.search.weight_parameters() + heads

    def extra_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        out = super().extra_optimizers(model)
        d = self.darts
        # the reference's evaluation-network optimizer also holds the distillation heads
        params = [*model.evalnet.parameters(), *model.distill_head1.parameters(), *model.distill_head2.parameters()]
        self.eval_opt = torch.optim.SGD(params, lr=d.eval_lr, momentum=0.9, weight_decay=d.eval_weight_decay)
        return {**out, "eval": self.eval_opt}

    def _cycle_position(self, epoch: int) -> int | None:
        """Epochs since the current cycle started (None during the search network's warm-up)."""
        d = self.darts
        if epoch < d.pretrain_epochs:
            return None
        return (epoch - d.pretrain_epochs) % (d.eval_warmup_epochs + d.cycle_epochs)

    def phase(self, epoch: int) -> str:
        """pretrain | eval_warmup | search."""
        k = self._cycle_position(epoch)
        if k is None:
            return "pretrain"
        return "eval_warmup" if k < self.darts.eval_warmup_epochs else "search"

    def loss(self, batch: Batch) -> StepResult:
        self.epoch, d = batch.epoch, self.darts
        if self._cycle_position(batch.epoch) == 0 and self.cycle_start != batch.epoch:
            self.model.set_active(self.genotype())
            self.cycle_start = batch.epoch
            log.info("epoch %d: the evaluation network takes %s", batch.epoch, self.model.arch)
        phase = self.phase(batch.epoch)
        if phase == "pretrain":
            return StepResult(self._weights_step(batch))
        x, y = self._arch_batch(batch)
        if phase == "eval_warmup":
            with self.ctx.autocast():
                loss = F.cross_entropy(self.model.evalnet(x).float(), y)
            self._own_step(loss, [self.eval_opt])
            return StepResult(loss.detach(), metrics={"eval_loss": float(loss.detach())})
        with self.ctx.autocast():
            loss, metrics = cdarts_step_loss(self.model, x, y, loss_alpha=d.loss_alpha, temperature=d.temperature)
        self._own_step(loss, [self.alpha_opt, self.eval_opt])
        return StepResult(self._weights_step(batch), metrics=metrics)

    def evaluate(self) -> dict[str, float]:
        self._record()
        r = self.ctx.evaluate(self.model)  # the evaluation network on its genotype
        s = self.ctx.evaluate(self.model.search)
        return {"val_top1": r["top1"], "val_loss": r["loss"], "val_top1_search": s["top1"]}

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["darts"].update(eval_genotype=self.model.arch.to_str(), cycle_start=self.cycle_start)
        return meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_tensors(tensors, meta)
        saved = meta.get("darts", {})
        if "eval_genotype" in saved:
            self.model.set_active(Genotype.from_str(saved["eval_genotype"]))
        self.cycle_start = int(saved.get("cycle_start", -1))
