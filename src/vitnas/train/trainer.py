"""The training loop, read top to bottom; what is trained and how its loss is computed is the task's
(`vitnas.train.tasks`). The trainer owns data order, optimizer and schedule, AMP, EMA, clipping,
checkpoint / resume, logging and DDP, and never learns a method's name.

Every random choice is derived from (seed, step[, rank]): the data order of an epoch, the subnet(s)
of a step (identical on every rank, with no communication) and the augmentation / dropout RNG. A
resumed run therefore replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitnas.checkpoint import optimizer_state, read_checkpoint, read_metadata, save_checkpoint
from vitnas.data.augment import recipe
from vitnas.data.datasets import ImageData, StreamSplit, epoch_batches, load_data
from vitnas.evaluation import evaluate
from vitnas.models.spec import spec_of
from vitnas.precision import amp_dtype
from vitnas.train.config import TrainConfig
from vitnas.train.dist import DistInfo, all_reduce_mean_, all_reduce_sum, barrier, init_distributed
from vitnas.train.runlog import RunLog
from vitnas.train.runtime import runtime_settings
from vitnas.train.tasks import Batch, Task, TaskContext, resolve_task

__all__ = ["StepInfo", "Trainer", "TrainingDiverged", "lr_at"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float, warmup_lr: float) -> float:
    """Linear warmup from `warmup_lr`, then cosine decay to `minimum`, per step."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepInfo:
    """One finished step: `step` counts steps done (1 after the first). `archs`: the subnets it trained."""

    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float = float("nan")
    archs: list[Any] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


# Settings a resumed run must share with the run that wrote the checkpoint (a task adds its own).
RESUME_KEYS = (
    "task",
    "data_path",
    "img_size",
    "val_per_class",
    "recipe",
    "augment",
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_lr",
    "warmup_epochs",
    "weight_decay",
    "optimizer",
    "momentum",
    "clip_grad",
    "drop_path",
    "ema_decay",
    "seed",
)


class Trainer:
    """Train what `cfg.task` names (or `task`, a Task instance). `fit()` resumes from
    `out_dir/last.safetensors` when `resume` is set and that file exists. Threads, deterministic
    kernels and the global RNG are set for construction and `fit()` only, then restored."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: ImageData | None = None,
        device: str | torch.device | None = None,
        resume: bool = False,
        progress: Callable[[StepInfo], None] | None = None,
        task: Task | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "last.safetensors"
        self.progress = progress
        self.resume = resume
        with runtime_settings(cfg.threads, cfg.deterministic):
            self.task = task or resolve_task(cfg)
            self._setup_data(data)
            self._setup_model()
        self.base_lr = cfg.lr * cfg.batch_size * self.dist.world / 512
        log.info(
            "peak lr %.3g = lr %.3g x global batch %d / 512 (lr is given for a batch of 512)",
            self.base_lr,
            cfg.lr,
            cfg.batch_size * self.dist.world,
        )
        groups = self.task.param_groups(self.model)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=self.base_lr, momentum=cfg.momentum, foreach=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, foreach=True)
        self.extra_optimizers = self.task.extra_optimizers(self.model)
        self.ema = (
            {k: v.detach().clone().float() for k, v in self.model.state_dict().items()} if cfg.ema_decay > 0 else None
        )
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_path = self.out / "best.safetensors"
        self.best: dict[str, Any] | None = None  # {"metric", "value", "epoch", "step"} of best.safetensors

    # -- setup ------------------------------------------------------------------------------------
    def _setup_data(self, data: ImageData | None) -> None:
        cfg = self.cfg
        self.img_size = self.task.img_size()
        self.data = (
            data
            or self.task.load_data(self.img_size)
            or load_data(
                cfg.data_path,
                img_size=self.img_size,
                val_per_class=cfg.val_per_class,
                seed=cfg.seed,
                skip_bad=cfg.skip_bad_images,
                workers=cfg.workers,
            )
        )
        self.data = self.task.prepare_data(self.data) or self.data  # a task may keep a part for itself
        self.aug_cfg = recipe(cfg.recipe).override(**cfg.augment).override(**self.task.norm_override())
        self.augment = self.task.build_augment(self.aug_cfg, self.img_size, self.data.num_classes)

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        ctx = TaskContext(
            device=self.device,
            amp_dtype=self.amp_dtype,
            backward=lambda loss: self.scaler.scale(loss).backward(),
            evaluate=self._evaluate,
            all_reduce_mean=lambda tensors: all_reduce_mean_(tensors, self.dist),
            rank=self.dist.rank,
            world=self.dist.world,
            all_reduce_sum=lambda tensor: all_reduce_sum(tensor, self.dist),
        )
        torch.manual_seed(cfg.seed)
        model = self.task.build_model(ctx, self.data.num_classes)
        if cfg.pretrained:
            from vitnas.models.weights import load_weights

            report = load_weights(model, cfg.pretrained)
            log.info("loaded %d tensors from %s", report["loaded"], cfg.pretrained)
        self.model = model.to(self.device)
        self.task.model, self.task.ctx = self.model, ctx

    def _amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.cfg.amp, self.device)

    def _steps_per_epoch(self) -> int:
        train = self.data.train
        if not isinstance(train, StreamSplit):
            return len(self.epoch_batches(0))
        if self.aug_cfg.repeats > 1:
            raise ValueError(
                f"augment repeats={self.aug_cfg.repeats} (repeated augmentation) needs an indexed training split; "
                f"{self.data.name} is streamed: set augment repeats=1"
            )
        return train.steps_per_epoch(self.cfg.batch_size, self.dist.world)

    def epoch_data(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[np.ndarray | None, torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(dataset indices or None, uint8 images, labels, extras) of this rank's batches of `epoch` from batch
        `start`: an indexed split by `epoch_batches`, a streamed one (`StreamSplit`) as it streams, with its
        per-sample extras (captions)."""
        train = self.data.train
        if isinstance(train, StreamSplit):
            cfg, d = self.cfg, self.dist
            for images, labels, extras in train.epoch(
                cfg.batch_size, epoch=epoch, seed=cfg.seed, rank=d.rank, world=d.world, start=start
            ):
                yield None, images, labels, extras
            return
        batches = self.epoch_batches(epoch)[start:]
        for index, (images, labels) in zip(batches, train.batches(batches), strict=True):
            yield index, images, labels, {}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The index batches of `epoch` on this rank (seeded by (seed, epoch); repeated augmentation)."""
        return epoch_batches(
            len(self.data.train),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=epoch,
            rank=self.dist.rank,
            world=self.dist.world,
            repeats=self.aug_cfg.repeats,
        )

    def _evaluate(self, model: nn.Module, arch: Any = None) -> dict[str, float]:
        """Top-1 / loss on the validation split, sharded over the ranks."""
        return evaluate(
            model,
            self.data.val,
            arch=arch,
            img_size=self.img_size,
            norm=self.aug_cfg,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            rank=self.dist.rank,
            world=self.dist.world,
            reduce=lambda t: all_reduce_sum(t, self.dist),
            amp_dtype=self.amp_dtype,
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: Path | None = None, *, resumable: bool = True) -> None:
        """Write a checkpoint (default: last.safetensors). `resumable=False` keeps the weights (and EMA)
        with the metadata but not the optimizer, RNG and task state: a model to evaluate or export."""
        if not self.dist.is_main:
            return
        meta = {
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "model": spec_of(self.model),
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.step // self.steps_per_epoch,
            "classes": self.data.classes,
            "val_images": len(self.data.val),
            "img_size": self.img_size,
            "norm": self.aug_cfg.to_dict(),
            "history": self.history,
            "scaler": self.scaler.state_dict(),
            "best": self.best,
            **self.task.checkpoint_meta(),
        }
        save_checkpoint(
            path or self.ckpt_path,
            weights=self.model.state_dict(),
            meta=meta,
            optimizer=self.optimizer if resumable else None,
            extra_optimizers=self.extra_optimizers if resumable else None,
            ema=self.ema,
            rng={"torch": torch.get_rng_state()} if resumable else None,
            task=self.task.state_tensors() if resumable else None,
        )

    def check_resumable(self, meta: dict[str, Any], path: Path) -> None:
        """Raise unless the checkpoint at `path` was written by a run with this run's settings."""
        saved = meta["config"]
        defaults = TrainConfig().to_dict()  # keys added since a checkpoint was written take their defaults
        for key in RESUME_KEYS + self.task.resume_keys:
            if saved.get(key, defaults[key]) != getattr(self.cfg, key):
                raise ValueError(
                    f"{path}: written by a run with {key}={saved.get(key)!r}; this run has "
                    f"{key}={getattr(self.cfg, key)!r}. Resume with the same settings or use another "
                    f"out_dir"
                )
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"{path}: saved with {meta['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch} (data or number of ranks changed)"
            )

    def load(self, path: Path) -> None:
        """Continue the run saved at `path`; its settings are checked before anything is loaded."""
        groups, meta = read_checkpoint(path)
        self.check_resumable(meta, path)
        self.model.load_state_dict(groups["model"], strict=True)
        opt = optimizer_state(groups, meta)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        for name, extra in self.extra_optimizers.items():
            state = optimizer_state(groups, meta, name)
            if state is None:
                raise ValueError(f"{path}: holds no state of the task's optimizer {name!r}")
            extra.load_state_dict(state)
        if self.ema is not None and groups["ema"]:
            self.ema = {k: v.to(self.device) for k, v in groups["ema"].items()}
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.task.load_state_tensors({k: v.to(self.device) for k, v in groups["task"].items()}, meta)
        if "torch" in groups["rng"]:
            torch.set_rng_state(groups["rng"]["torch"])
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        self.best = meta.get("best")
        log.info("resumed from %s at step %d", path, self.step)

    def is_finished(self) -> bool:
        """True when `out_dir` holds a checkpoint of this run that reached its last step."""
        return self.ckpt_path.is_file() and read_metadata(self.ckpt_path)["step"] >= self.total_steps

    # -- the loop ---------------------------------------------------------------------------------
    def _seed_step(self, step: int) -> None:
        torch.manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + self.dist.rank) % (2**63))

    def _optimizer_step(self, loss: torch.Tensor) -> float:
        # Parameters the step did not use (another path's blocks, layers past the active depth) keep no
        # gradient, so the optimizer leaves them alone: a zero gradient would let Adam's momentum keep moving
        # them for many steps after their last use and weight decay shrink them while unused. Every rank
        # trains the same subnets each step, so every rank holds the same set.
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in params]
        loss_buf = loss.reshape(1).float().clone()
        all_reduce_mean_(grads + [loss_buf], self.dist)
        loss_value = float(loss_buf)
        if not math.isfinite(loss_value):
            return loss_value
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(params, self.cfg.clip_grad, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            d = self.cfg.ema_decay
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    self.ema[k].mul_(d).add_(v.float(), alpha=1 - d)
        return loss_value

    def train_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        index: np.ndarray | None = None,
        extras: dict[str, Any] | None = None,
    ) -> StepInfo:
        """One optimization step at `self.step` on a raw (un-augmented) batch; advances `self.step`.
        `index`: the images' dataset indices, for tasks that read per-sample data; `extras`: per-sample data a
        streamed split carries with the batch (captions). Seeds the global torch RNG for the step
        (augmentation, dropout), as `fit` does."""
        cfg, step = self.cfg, self.step
        epoch = step // self.steps_per_epoch
        self._seed_step(step)
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        lr = lr_at(step, self.total_steps, warmup, self.base_lr, cfg.min_lr, cfg.warmup_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = labels.to(self.device)
        x, targets = self.augment(images.to(self.device, non_blocking=True), labels, index, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.task.loss(Batch(x, targets, labels, index, epoch, step, extras or {}))
        loss = self._optimizer_step(result.loss)
        if not math.isfinite(loss):
            kept = (
                f"the last good checkpoint is {self.ckpt_path}"
                if self.ckpt_path.is_file()
                else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"loss became {loss} at step {step} (epoch {epoch}); {kept}. Lower lr (now {lr:.2e}) or set clip_grad."
            )
        self.task.after_step()
        self.step += 1
        return StepInfo(self.step, self.total_steps, epoch, loss, lr, archs=result.archs, metrics=result.metrics)

    def _start(self) -> None:
        if self.resume and self.ckpt_path.is_file():
            self.load(self.ckpt_path)
        elif self.resume:
            log.info("no checkpoint at %s; starting from scratch", self.ckpt_path)
        elif self.ckpt_path.is_file():
            raise ValueError(
                f"{self.ckpt_path} exists: pass --resume to continue that run, or choose another "
                f"out_dir (nothing is overwritten)"
            )
        if self.dist.enabled:  # every rank must continue from the same step (a shared out_dir)
            steps = all_reduce_sum(torch.tensor([self.step, self.step**2], dtype=torch.float64), self.dist)
            if steps[0] ** 2 != steps[1] * self.dist.world:
                raise RuntimeError(f"ranks resumed at different steps; out_dir {self.out} must be shared by all ranks")

    def fit(self) -> dict[str, Any]:
        with runtime_settings(self.cfg.threads, self.cfg.deterministic):
            self._start()
            logger = RunLog(self.out, self.step) if self.dist.is_main else None
            self.model.train()
            while self.step < self.total_steps:
                self._run_epoch(logger)
            barrier(self.dist)
            if logger:
                logger.close()
        return {"step": self.step, "history": self.history, "checkpoint": str(self.ckpt_path)}

    def _run_epoch(self, logger: RunLog | None) -> None:
        cfg = self.cfg
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        t_last, seen, ips = time.perf_counter(), 0, float("nan")
        for index, images, labels, extras in self.epoch_data(epoch, offset):
            info = self.train_step(images, labels, index, extras)
            seen += images.shape[0] * self.dist.world
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                ips = seen / max(now - t_last, 1e-9)
                t_last, seen = now, 0
                if logger:
                    logger.train_row(self.step, epoch, info.loss, info.lr, ips)
            info.images_per_s = ips
            if self.progress:
                self.progress(info)
            if self.step % cfg.ckpt_every == 0 and self.step % self.steps_per_epoch != 0:
                self.save()
            if self.step >= self.total_steps:
                break
        epoch_done = self.step // self.steps_per_epoch
        if epoch_done % cfg.eval_every == 0 or self.step == self.total_steps:
            scores = self.task.evaluate()
            metrics = {"epoch": epoch_done, "step": self.step, **scores}
            self.history.append(metrics)
            log.info("epoch %d (step %d): %s", epoch_done, self.step, _fmt(scores))
            if logger:
                logger.val_row(metrics, self.step)
                self.task.write_reports(self.out)
            self._keep_best(scores, epoch_done)
        self.save()

    def _keep_best(self, scores: dict[str, float], epoch: int) -> None:
        """Write best.safetensors when the task's best metric improved (written before last.safetensors,
        so a kill between the two leaves a best checkpoint that last.safetensors already knows of)."""
        name = self.task.best_metric
        if name is None or name not in scores or (self.best is not None and scores[name] <= self.best["value"]):
            return
        self.best = {"metric": name, "value": scores[name], "epoch": epoch, "step": self.step}
        self.save(self.best_path, resumable=False)

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics (e.g. val_top1, or largest / smallest subnets of a supernet)."""
        return self.task.evaluate()


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
