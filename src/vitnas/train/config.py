"""Training configuration: one plain dataclass, read from YAML and overridden by CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitnas._config import check_fields, check_range
from vitnas.precision import AMP_MODES
from vitnas.space.yaml_io import load_yaml

__all__ = ["TrainConfig", "SAMPLINGS", "RETRAIN_TASKS", "SUPERNET_TASKS"]

# Task names that train one model (an arch or a registered model); "subnet" is the name configs have
# always used for either. Other task names are checked against the task registry by the trainer.
RETRAIN_TASKS = ("subnet", "arch", "registry")
SUPERNET_TASKS = ("supernet", "cream", "cdarts", "darts")  # tasks whose checkpoint is a supernet to search
SAMPLINGS = ("uniform", "sandwich")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    # -- what to train
    task: str = "supernet"  # supernet | subnet (one arch, or a registered model) | any registered training task
    space: str = "cifar"  # search space preset name or YAML path
    arch: str | None = None  # subnet task: arch YAML (ours, or an AutoFormer config's RETRAIN section)
    model: str | None = None  # subnet task: a registered model instead of an arch (`vitnas models` lists them)
    model_args: dict[str, Any] = field(default_factory=dict)  # model: create_model arguments, e.g. depth=6
    pretrained: str | None = (
        None  # initial weights (.pth/.safetensors; a supernet's for a supernet); another-size head starts fresh
    )
    init_from: str | None = None  # subnet task: supernet checkpoint whose weights the subnet inherits
    sampling: str = "uniform"  # supernet task: uniform (AutoFormer, one random subnet per step) | sandwich
    sandwich_random: int = 2  # sandwich rule: random subnets per step besides the largest and smallest
    inplace_distill: bool = True  # sandwich rule: smaller subnets learn the largest one's predictions
    min_mmacs: float = 0.0  # supernet tasks: sample only paths of at least this many million MACs
    max_mmacs: float | None = None  # supernet tasks: ... and at most this many (null: no bound)
    cream: dict[str, Any] = field(default_factory=dict)  # task cream: CreamConfig fields (board_size, pick, ...)
    darts: dict[str, Any] = field(default_factory=dict)  # darts / cdarts: DartsSearchConfig (alpha_lr, cycle_epochs..)
    clip: dict[str, Any] = field(default_factory=dict)  # tasks clip / tinyclip: ClipConfig fields (alpha, auto, ...)
    bilateral: bool = False  # supernet: alternate left / right width slicing step by step (BCNet, ViTAS)
    teacher: str | None = (
        None  # distil from: an exported folder, a checkpoint, or a registered model (+ teacher_weights)
    )
    teacher_weights: str | None = None  # weights of a registered-model teacher (.pth / .safetensors)
    teacher_dtype: str = (
        "auto"  # auto (bf16 autocast where amp auto picks it, else fp32) | float32 | bfloat16 | float16
    )
    distill: str = "soft"  # with a teacher: soft (KL at distill_tau) | hard (CE on its argmax) | minivit (relations)
    distill_alpha: float = 0.5  # weight of the distillation loss; 1 - alpha goes to the label loss
    distill_tau: float = 1.0  # soft KD temperature
    distill_logits: str | None = None  # a `vitnas save-logits` store: train on its stored teacher top-K (TinyViT)
    reuse_epochs: bool = False  # with distill_logits: cycle the stored epochs when training runs longer
    distill_layers: str = "auto"  # minivit: student:teacher block pairs, e.g. "1:3,3:7"; auto = evenly spaced
    distill_attn_weight: float = 1.0  # minivit: weight of the attention-relation (q/k/v) loss
    distill_hidden_weight: float = 0.1  # minivit: weight of the hidden-state-relation loss
    distill_relation_heads: int = 1  # minivit: relation heads the q/k/v channels are split into (Ar)
    # -- data
    data_path: str | None = None  # train/, test/ (or val/) class folders; None: digits; CLIP: .csv/.tsv, .tar shards
    img_size: int | None = None  # default: the space's img_size
    val_per_class: int = 100  # training images per class held out for validation (search / selection)
    recipe: str = "cifar"  # augmentation recipe: deit | tinyvit (deit, 1 view per epoch) | cifar | digits | none
    augment: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's fields
    skip_bad_images: bool = False  # skip (and count) unreadable files instead of stopping
    workers: int = 2  # DataLoader workers when images stream from disk
    # -- optimization
    epochs: int = 10  # passes over the training split
    max_steps: int | None = None  # stop (and end the lr schedule) after this many steps; null = epochs decide
    batch_size: int = 128  # images per step, per rank
    lr: float = 5e-4  # peak lr AT A GLOBAL BATCH OF 512: the run uses lr x batch_size x ranks / 512 (logged)
    min_lr: float = 1e-5  # lr at the end of the cosine decay (not scaled)
    warmup_lr: float = 1e-6  # lr at step 0, rising linearly to the peak over warmup_epochs (not scaled)
    warmup_epochs: float = 1.0  # linear warmup length, in epochs
    optimizer: str = "adamw"  # the weights' optimizer: adamw | sgd (with momentum; DARTS / CDARTS)
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 0.05  # weight decay (none on biases, norms, position tables)
    clip_grad: float | None = 5.0  # max gradient norm; null = off
    drop_path: float = 0.1
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 = off
    amp: str = "auto"  # auto (CUDA: bf16 or fp16; CPU: bf16 with AMX or AVX512-BF16, else fp32) | off | bf16 | fp16
    # -- bookkeeping
    seed: int = 0  # seeds weights, data order, validation split, subnets and augmentation
    deterministic: bool = False  # deterministic kernels (exact resume and reproducible runs)
    threads: int | None = None  # torch CPU threads; default: torch's choice
    out_dir: str = "runs/train"  # checkpoints (last.safetensors), metrics.csv and tb/ go here
    ckpt_every: int = 200  # steps between checkpoints (one is also written at every epoch end)
    eval_every: int = 1  # epochs between validation passes
    eval_batch_size: int = 256
    log_every: int = 10  # steps between log rows

    def __post_init__(self) -> None:
        self.check("config")

    def check(self, source: str) -> None:
        """Convert YAML strings such as '5e-4' to numbers; raise naming the key for anything else."""
        check_fields(self, source)
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "drop_path", "warmup_epochs"):
            check_range(source, name, getattr(self, name), 0.0)
        check_range(source, "ema_decay", self.ema_decay, 0.0, 1.0)
        check_range(source, "distill_alpha", self.distill_alpha, 0.0, 1.0)
        check_range(source, "distill_tau", self.distill_tau, 0.0, strict_lo=True)
        check_range(source, "drop_path", self.drop_path, 0.0, 1.0)
        check_range(source, "distill_attn_weight", self.distill_attn_weight, 0.0)
        check_range(source, "distill_hidden_weight", self.distill_hidden_weight, 0.0)
        check_range(source, "distill_relation_heads", self.distill_relation_heads, 1)
        check_range(source, "val_per_class", self.val_per_class, 1)
        check_range(source, "sandwich_random", self.sandwich_random, 0)
        check_range(source, "min_mmacs", self.min_mmacs, 0.0)
        check_range(source, "max_mmacs", self.max_mmacs, 0.0, strict_lo=True)
        if self.max_mmacs is not None and self.max_mmacs < self.min_mmacs:
            raise ValueError(f"{source}: max_mmacs={self.max_mmacs} is below min_mmacs={self.min_mmacs}")
        check_range(source, "seed", self.seed, 0)
        check_range(source, "workers", self.workers, 0)
        check_range(source, "clip_grad", self.clip_grad, 0.0, strict_lo=True)
        for name in ("epochs", "batch_size", "ckpt_every", "log_every", "eval_every", "eval_batch_size"):
            check_range(source, name, getattr(self, name), 1)
        check_range(source, "max_steps", self.max_steps, 1)
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"{source}: task={self.task!r}; expected a task name such as 'supernet' or 'subnet'")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"{source}: sampling={self.sampling!r}; expected one of {SAMPLINGS}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"{source}: amp={self.amp!r}; expected one of {AMP_MODES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{source}: optimizer={self.optimizer!r}; expected one of {OPTIMIZERS}")
        check_range(source, "momentum", self.momentum, 0.0, 1.0)
        if self.task in RETRAIN_TASKS and bool(self.arch) == bool(self.model):
            raise ValueError(
                f"{source}: task {self.task!r} needs exactly one of arch (an arch YAML to train) or model (a "
                f"registered model name); got arch={self.arch!r}, model={self.model!r}"
            )
        needs = {"arch": "arch", "registry": "model"}.get(self.task)
        if needs and not getattr(self, needs):
            raise ValueError(
                f"{source}: task {self.task!r} trains one {needs}: set {needs} (got arch={self.arch!r}, "
                f"model={self.model!r})"
            )
        if self.task in SUPERNET_TASKS and self.model:
            raise ValueError(f"{source}: model={self.model!r} is for retrain (task 'subnet'), not supernet training")
        if self.pretrained and self.init_from:
            raise ValueError(
                f"{source}: pretrained={self.pretrained!r} and init_from both initialise the model; give one"
            )
        if self.distill == "minivit" and (self.distill_logits or not self.teacher):
            raise ValueError(
                f"{source}: distill 'minivit' distils a live teacher's attention and hidden states: set teacher "
                f"(and not distill_logits, which holds only logits)"
            )
        if self.model_args and not self.model:
            raise ValueError(f"{source}: model_args={self.model_args!r} are create_model arguments: set model too")
        if self.model and self.init_from:
            raise ValueError(
                f"{source}: init_from inherits supernet weights into an arch; it does not apply to model={self.model!r}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        if isinstance(data.get("augment"), dict) and isinstance(overrides.get("augment"), dict):
            overrides["augment"] = {**data["augment"], **overrides["augment"]}  # flags refine, not replace
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"{source}: unknown key {key!r}; expected one of {names}")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(obj, f.name, data.get(f.name, default))
        obj.check(source)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
