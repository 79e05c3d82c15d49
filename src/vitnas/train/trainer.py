"""A training loop you can read top to bottom: supernet (uniform or sandwich sampling) or one subnet.

Every random choice is derived from (seed, step[, rank]): the data order of an epoch, the subnet(s)
of a step (identical on every rank, with no communication) and the augmentation / dropout RNG. A
resumed run therefore replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitnas.data.augment import BatchAugment, recipe
from vitnas.data.datasets import ImageData, epoch_batches, load_data
from vitnas.evaluation import evaluate
from vitnas.models.registry import create_model, model_input_size
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace
from vitnas.train.checkpoint import load_model, optimizer_state, read_checkpoint, read_metadata, save_checkpoint
from vitnas.train.config import TrainConfig
from vitnas.train.dist import DistInfo, all_reduce_mean_, all_reduce_sum, barrier, init_distributed

__all__ = ["Trainer", "TrainingDiverged", "lr_at", "sample_step_archs"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float, warmup_lr: float) -> float:
    """Linear warmup from `warmup_lr`, then cosine decay to `minimum`, per step."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sample_step_archs(space: SearchSpace, cfg: TrainConfig, step: int) -> list[ArchConfig]:
    """The subnets of one step, a pure function of (seed, step): the same on every rank."""
    rng = np.random.default_rng([cfg.seed, step, 17])
    if cfg.sampling == "uniform":
        return [space.sample(rng)]
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.sandwich_random)]


def _default_img_size(name: str) -> int:
    """The image size a registered model is built for when the config names none."""
    with torch.device("meta"):
        return model_input_size(create_model(name))[1]


def _skip_weight_decay(model: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Biases, norms, position embeddings and bias tables: the model's timm-style `no_weight_decay()`
    names and `no_weight_decay_keywords()` substrings (ViTs: pos_embed and cls_token)."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else {"pos_embed", "cls_token"}
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    return p.ndim <= 1 or name in names or any(k in name for k in keywords)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@dataclass
class StepInfo:
    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float


class Trainer:
    """Train a supernet or a subnet as `cfg` says. `fit()` resumes from `out_dir/last.safetensors`
    when `resume` is set and that file exists."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: ImageData | None = None,
        device: str | torch.device | None = None,
        resume: bool = False,
        progress: Callable[[StepInfo], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
        # Fine-tuning a subnet of a supernet: same space, image size, normalization and data split.
        self.parent = read_metadata(cfg.init_from) if cfg.task == "subnet" and cfg.init_from else None
        if self.parent is not None:
            if self.parent["model"]["kind"] != "supernet":
                raise ValueError(
                    f"{cfg.init_from}: init_from must be a supernet checkpoint, this one holds a "
                    f"{self.parent['model']['kind']} model"
                )
            for key in ("data_path", "seed", "val_per_class"):
                if self.parent["config"][key] != getattr(cfg, key):
                    raise ValueError(
                        f"{cfg.init_from}: the supernet was trained with {key}={self.parent['config'][key]!r}, this "
                        f"run has {key}={getattr(cfg, key)!r}; they must match, or the training split would "
                        f"contain the validation images the search ranked on"
                    )
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "last.safetensors"
        self.progress = progress
        self.resume = resume
        if self.parent is not None:
            self.space = SearchSpace(**self.parent["model"]["space"])
            img = self.parent["img_size"]
        else:
            self.space = (
                SearchSpace.from_yaml(cfg.space)
                if Path(cfg.space).suffix in (".yaml", ".yml")
                else SearchSpace.preset(cfg.space)
            )
            img = cfg.img_size or self.space.img_size
        if cfg.model:
            img = cfg.img_size or _default_img_size(cfg.model)
        self.data = data or load_data(
            cfg.data_path,
            img_size=img,
            val_per_class=cfg.val_per_class,
            seed=cfg.seed,
            skip_bad=cfg.skip_bad_images,
            workers=cfg.workers,
        )
        self.img_size = img
        self.aug_cfg = recipe(cfg.recipe).override(**cfg.augment)
        if self.parent is not None:
            if self.parent["classes"] != self.data.classes:
                raise ValueError(
                    f"{cfg.init_from}: trained on classes {self.parent['classes']}, the data has {self.data.classes}"
                )
            norm = self.parent["norm"]
            self.aug_cfg = self.aug_cfg.override(mean=norm["mean"], std=norm["std"])
        self.augment = BatchAugment(self.aug_cfg, img, self.data.num_classes)
        self.model = self._build_model()
        if cfg.pretrained:
            from vitnas.models.weights import load_weights

            report = load_weights(self.model, cfg.pretrained)
            log.info("loaded %d tensors from %s", report["loaded"], cfg.pretrained)
        self.model = self.model.to(self.device)
        self.is_supernet = cfg.task == "supernet"
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if _skip_weight_decay(self.model, name, p) else decay).append(p)
        world_batch = cfg.batch_size * self.dist.world
        self.base_lr = cfg.lr * world_batch / 512
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.base_lr,
            foreach=True,
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = (
            {k: v.detach().clone().float() for k, v in self.model.state_dict().items()} if cfg.ema_decay > 0 else None
        )
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # -- setup ------------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        from vitnas.models.vit import VisionTransformer
        from vitnas.supernet.vit import ViTSupernet

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        kwargs = dict(img_size=self.img_size, num_classes=self.data.num_classes, drop_path_rate=cfg.drop_path)
        if cfg.task == "supernet":
            return ViTSupernet(self.space, **kwargs)
        if cfg.model:
            return create_model(cfg.model, **kwargs)
        arch = ArchConfig.from_yaml(cfg.arch)
        if cfg.init_from:
            supernet, _ = load_model(cfg.init_from)
            if supernet.num_classes != self.data.num_classes:
                raise ValueError(
                    f"{cfg.init_from}: supernet has {supernet.num_classes} classes, the data {self.data.num_classes}"
                )
            supernet.drop_path_rates = [
                cfg.drop_path * i / max(supernet.max_depth - 1, 1) for i in range(supernet.max_depth)
            ]
            log.info("inheriting %s from %s", arch.key(), cfg.init_from)
            return supernet.extract(arch).train()
        space = self.space
        return VisionTransformer.from_arch(
            arch,
            img_size=self.img_size,
            patch_size=space.patch_size,
            num_classes=self.data.num_classes,
            head_dim=space.head_dim,
            rel_pos_max=space.rel_pos_max,
            drop_path_rate=cfg.drop_path,
        )

    def _amp_dtype(self) -> torch.dtype | None:
        mode = self.cfg.amp
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(
            len(self.data.train),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=epoch,
            rank=self.dist.rank,
            world=self.dist.world,
            repeats=self.aug_cfg.repeats,
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: Path | None = None) -> None:
        if not self.dist.is_main:
            return
        meta = {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.step // self.steps_per_epoch,
            "classes": self.data.classes,
            "img_size": self.img_size,
            "norm": self.aug_cfg.to_dict(),
            "history": self.history,
            "scaler": self.scaler.state_dict(),
        }
        if self.cfg.task == "subnet" and not self.cfg.model:
            meta["arch"] = self.model.arch.to_dict()
        rng = {"torch": torch.get_rng_state()}
        save_checkpoint(
            path or self.ckpt_path, model=self.model, meta=meta, optimizer=self.optimizer, ema=self.ema, rng=rng
        )

    # Settings a resumed run must share with the run that wrote the checkpoint.
    RESUME_KEYS = (
        "bilateral",
        "task",
        "space",
        "arch",
        "model",
        "pretrained",
        "init_from",
        "sampling",
        "sandwich_random",
        "data_path",
        "img_size",
        "val_per_class",
        "recipe",
        "augment",
        "epochs",
        "batch_size",
        "lr",
        "min_lr",
        "warmup_lr",
        "warmup_epochs",
        "weight_decay",
        "clip_grad",
        "drop_path",
        "ema_decay",
        "seed",
    )

    def load(self, path: Path) -> None:
        """Continue the run saved at `path`; its settings are checked before anything is loaded."""
        groups, meta = read_checkpoint(path)
        saved = meta["config"]
        defaults = TrainConfig().to_dict()  # keys added since a checkpoint was written take their defaults
        for key in self.RESUME_KEYS:
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
        self.model.load_state_dict(groups["model"], strict=True)
        opt = optimizer_state(groups, meta)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        if self.ema is not None and groups["ema"]:
            self.ema = {k: v.to(self.device) for k, v in groups["ema"].items()}
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        if "torch" in groups["rng"]:
            torch.set_rng_state(groups["rng"]["torch"])
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ---------------------------------------------------------------------------------
    def _seed_step(self, step: int) -> None:
        torch.manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + self.dist.rank) % (2**63))

    def _forward_loss(self, x: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        """Forward + backward of one step (all its subnets); returns the mean loss."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        if not self.is_supernet:
            with autocast:
                loss = soft_cross_entropy(self.model(x), targets)
            self.scaler.scale(loss).backward()
            return loss.detach()
        archs = sample_step_archs(self.space, self.cfg, step)
        total = torch.zeros((), device=self.device)
        teacher = None
        side = "right" if (self.cfg.bilateral or self.space.bilateral) and step % 2 else "left"
        for i, arch in enumerate(archs):
            self.model.set_active(arch, side)
            with autocast:
                logits = self.model(x)
                use_kd = self.cfg.sampling == "sandwich" and self.cfg.inplace_distill and i > 0
                loss = soft_cross_entropy(logits, teacher if use_kd else targets)
            if self.cfg.sampling == "sandwich" and i == 0:
                teacher = F.softmax(logits.detach().float(), dim=-1)
            self.scaler.scale(loss / len(archs)).backward()
            total += loss.detach() / len(archs)
        self.last_archs = archs
        return total

    def _optimizer_step(self, loss: torch.Tensor) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
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

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
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
        csv_log = _CsvLog(self.out / "metrics.csv", self.step) if self.dist.is_main else None
        tb = _tensorboard(self.out / "tb", self.step) if self.dist.is_main else None
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.model.train()
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = self._epoch_batches(epoch)[offset:]
            t_last, seen, ips = time.perf_counter(), 0, float("nan")
            for images, labels in self.data.train.batches(batches):
                self._seed_step(self.step)
                lr = lr_at(self.step, self.total_steps, warmup, self.base_lr, cfg.min_lr, cfg.warmup_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x, targets = self.augment(images.to(self.device, non_blocking=True), labels.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._optimizer_step(self._forward_loss(x, targets, self.step))
                if not math.isfinite(loss):
                    kept = (
                        f"the last good checkpoint is {self.ckpt_path}"
                        if self.ckpt_path.is_file()
                        else "no checkpoint was written yet"
                    )
                    raise TrainingDiverged(
                        f"loss became {loss} at step {self.step} (epoch {epoch}); {kept}. "
                        f"Lower lr (now {lr:.2e}) or set clip_grad."
                    )
                self.step += 1
                seen += x.shape[0] * self.dist.world
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    ips = seen / max(now - t_last, 1e-9)
                    t_last, seen = now, 0
                    row = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_s": ips}
                    if csv_log:
                        csv_log.write(row)
                    if tb:
                        tb.add_scalar("train/loss", loss, self.step)
                        tb.add_scalar("train/lr", lr, self.step)
                        tb.add_scalar("train/images_per_s", ips, self.step)
                if self.progress:
                    self.progress(StepInfo(self.step, self.total_steps, epoch, loss, lr, ips))
                if self.step % cfg.ckpt_every == 0 and self.step % self.steps_per_epoch != 0:
                    self.save()
                if self.step >= self.total_steps:
                    break
            # end of epoch
            epoch_done = self.step // self.steps_per_epoch
            if epoch_done % cfg.eval_every == 0 or self.step == self.total_steps:
                metrics = {"epoch": epoch_done, "step": self.step, **self.validate()}
                self.history.append(metrics)
                log.info("epoch %d: %s", epoch_done, _fmt(metrics))
                if tb:
                    for k, v in metrics.items():
                        if k not in ("epoch", "step"):
                            tb.add_scalar(f"val/{k}", v, self.step)
            self.save()
        barrier(self.dist)
        if tb:
            tb.close()
        return {"step": self.step, "history": self.history, "checkpoint": str(self.ckpt_path)}

    def validate(self) -> dict[str, float]:
        """Validation top-1: the model, or the largest and smallest subnets of a supernet."""
        kw = dict(
            img_size=self.img_size,
            norm=self.aug_cfg,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            rank=self.dist.rank,
            world=self.dist.world,
            reduce=lambda t: all_reduce_sum(t, self.dist),
        )
        if not self.is_supernet:
            r = evaluate(self.model, self.data.val, **kw)
            return {"val_top1": r["top1"], "val_loss": r["loss"]}
        out = {}
        for name, arch in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
            r = evaluate(self.model, self.data.val, arch=arch, **kw)
            out[f"val_top1_{name}"] = r["top1"]
        return out


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class _CsvLog:
    """metrics.csv, truncated to the resumed step so a resumed run has no duplicate rows."""

    FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]

    def __init__(self, path: Path, start_step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.is_file() and start_step > 0:
            with open(path, newline="") as f:
                rows = [
                    r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= start_step
                ]
        self.path = path
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow({k: row[k] for k in self.FIELDS})


def _tensorboard(path: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but stay usable without it
        log.warning("tensorboard is not installed; writing CSV logs only")
        return None
    return SummaryWriter(str(path), purge_step=start_step or None)
