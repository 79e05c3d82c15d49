"""The training-task interface: what differs between training methods, so the trainer never does.

A task builds the model(s), computes the loss of a step (any number of forward passes, each followed
by `ctx.backward`), evaluates, and says what it adds to a checkpoint. The `Trainer` owns the loop:
data order, optimizer and schedule, AMP, EMA, clipping, checkpoint / resume, logging and DDP.

Register a new method with `@register_task("name")`; `TrainConfig.task = "name"` then selects it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vitnas.data.augment import AugmentConfig, BatchAugment
from vitnas.distill.losses import soft_cross_entropy
from vitnas.precision import autocast

__all__ = [
    "Augment",
    "Batch",
    "StepResult",
    "Task",
    "TaskContext",
    "register_task",
    "soft_cross_entropy",
    "task_names",
    "task_class",
]

_TASKS: dict[str, type[Task]] = {}

# augment(raw uint8 images, labels, dataset indices or None, epoch) -> (model input, soft targets)
Augment = Callable[[torch.Tensor, torch.Tensor, "np.ndarray | None", int], tuple[torch.Tensor, torch.Tensor]]


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def add(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"training task {name!r} is registered twice")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return add


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"task={name!r}; expected one of {task_names()}")
    return _TASKS[name]


@dataclass
class Batch:
    """One training step's input. `targets` are the augmented soft labels; `labels` the hard ones before
    mixing; `index` the dataset indices of the images (to look up per-sample data such as stored teacher
    logits, together with `epoch`), None when the caller of `train_step` gave none or the split is a stream;
    `extras` the per-sample data a streamed split carries with the batch (e.g. "captions")."""

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    index: np.ndarray | None
    epoch: int
    step: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """What a step reports: its (detached) loss, the subnets it trained, and any other scalars."""

    loss: torch.Tensor
    archs: list[Any] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What the trainer lends a task: where to run and how to backpropagate / evaluate under its
    AMP, gradient scaling and distributed settings."""

    device: torch.device
    amp_dtype: torch.dtype | None
    backward: Callable[[torch.Tensor], None]
    evaluate: Callable[..., dict[str, float]]  # evaluate(model, arch=None) -> {'top1', 'loss', 'n'} on val
    # average tensors across ranks in place (gradients of a task's own optimizer, statistics every rank must
    # agree on); a no-op in one process
    all_reduce_mean: Callable[[list[torch.Tensor]], None] = lambda tensors: None
    # this process's rank among `world` ranks, and the sum of a tensor over the ranks (returned; the input is left
    # alone): for a task that shards its own evaluation
    rank: int = 0
    world: int = 1
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)


class Task:
    """Base class of training tasks. Subclasses implement `build_model` and usually `loss`/`evaluate`.

    Order of calls: `__init__(cfg)`, `img_size()`, `prepare_data(data)`, `build_augment(...)`,
    `build_model(ctx)`, `param_groups(model)`, `extra_optimizers(model)`, then per step `loss(batch)`,
    per evaluation `evaluate()`, per checkpoint `checkpoint_meta()` / `state_tensors()`, and on resume
    `load_state_tensors()` after the model and optimizers are restored.
    """

    name: ClassVar[str] = "task"
    # TrainConfig fields (beyond the trainer's) that a resumed run must share with the one that saved.
    resume_keys: ClassVar[tuple[str, ...]] = ()
    # The `evaluate()` metric (higher is better) whose best value the trainer keeps in best.safetensors;
    # None: keep no best checkpoint.
    best_metric: ClassVar[str | None] = "val_top1"
    # The task reads the config's `teacher` itself (e.g. a CLIP teacher): `resolve_task` does not wrap it in
    # a distillation task.
    owns_teacher: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.ctx: TaskContext | None = None
        self.model: nn.Module | None = None

    # -- setup
    def img_size(self) -> int:
        """The training resolution."""
        raise NotImplementedError

    def norm_override(self) -> dict[str, Any]:
        """AugmentConfig fields the task fixes (e.g. a parent supernet's mean / std)."""
        return {}

    def load_data(self, img_size: int) -> Any:
        """Data the task reads itself instead of the class-labelled images the trainer loads from `data_path`
        (e.g. image-caption pairs from a CSV): an `ImageData` whose `train` split is indexed like any other.
        None: the trainer loads `data_path`."""

    def prepare_data(self, data: Any) -> Any:
        """Check the loaded data (e.g. that a parent checkpoint saw the same classes). A task may return other
        data for the trainer (e.g. the training split without the images it holds out for itself); None
        keeps `data`."""

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def build_augment(self, cfg: AugmentConfig, img_size: int, num_classes: int) -> Augment:
        """The training augmentation, `augment(images, labels, index, epoch) -> (images, soft targets)`:
        by default the batched recipe (`BatchAugment`, drawn from the step's RNG); a task that must see
        each image's own augmentation (replayed stored logits) returns its own."""
        batch_augment = BatchAugment(cfg, img_size, num_classes)
        return lambda images, labels, index, epoch: batch_augment(images, labels)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The main optimizer's parameter groups: no weight decay on biases, norms and position tables."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if _skip_weight_decay(model, name, p) else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def extra_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """Optimizers the task steps itself (architecture parameters, a meta-network, ...); the trainer
        checkpoints and resumes them with the main one."""
        return {}

    # -- a step
    def loss(self, batch: Batch) -> StepResult:
        """Forward + backward of one step (call `self.ctx.backward` on each loss); returns the mean loss."""
        assert self.ctx is not None and self.model is not None
        with self.ctx.autocast():
            loss = soft_cross_entropy(self.model(batch.images), batch.targets)
            aux = getattr(self.model, "aux_logits", None)  # an auxiliary head's logits (DARTS networks)
            if aux is not None:
                loss = loss + self.model.aux_weight * soft_cross_entropy(aux, batch.targets)
        self.ctx.backward(loss)
        return StepResult(loss.detach())

    def after_step(self) -> None:
        """Called after each optimizer step of the weights: where a task clamps or projects parameters
        (CLIP's logit scale)."""

    # -- evaluation and checkpoints
    def evaluate(self) -> dict[str, float]:
        assert self.ctx is not None
        r = self.ctx.evaluate(self.model)
        return {"val_top1": r["top1"], "val_loss": r["loss"]}

    def write_reports(self, out_dir: Any) -> None:
        """Files worth looking at while the run goes on (plots), written after each evaluation on the main
        rank; none by default."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON the task adds to every checkpoint's metadata (next to "config", "model", "step")."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the task must get back on resume, besides the model and optimizers."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_tensors` / `checkpoint_meta` saved."""


def _skip_weight_decay(model: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Biases, norms, position embeddings and bias tables: the model's timm-style `no_weight_decay()`
    names and `no_weight_decay_keywords()` substrings (ViTs: pos_embed and cls_token)."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else {"pos_embed", "cls_token"}
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    return p.ndim <= 1 or name in names or any(k in name for k in keywords)
