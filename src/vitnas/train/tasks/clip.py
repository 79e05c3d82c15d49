"""CLIP training (`task: clip`) and TinyCLIP distillation (`task: tinyclip`) on image-caption pairs.

Captions come from the class-labelled data the trainer loads (an image-class folder, or the bundled digits):
each image's caption is one prompt template filled with its class name ("a blurry photo of a cat."), the
template drawn per (image index, epoch, seed) by `caption_choices`, so a run is reproducible and a resumed run
sees exactly the captions the uninterrupted one would. Every (template, class) caption is tokenized once, up
front. A .csv / .tsv `data_path` of (image path, caption) rows (open_clip's layout) is read instead through the
task's `load_data` hook, as an indexed split whose labels are row numbers; its zero-shot evaluation runs on
`clip.eval_data` (a class folder or the digits). Webdataset shards (a .tar, a brace pattern) are streamed: the
trainer takes them as a `StreamSplit` whose batches carry their captions, resumable mid-epoch and sharded
across ranks by shard (`vitnas.data.image_text.ShardStream`). Images are normalised with CLIP's mean /
std; mixup and cutmix are switched off (they would blend images whose captions stay apart). Evaluation is
zero-shot top-1 / top-5 on the validation split with the same prompts.

- `clip`: contrastive (InfoNCE) training of `model` from scratch, features gathered across ranks as open_clip
  does; a learnable logit scale clamped at 100 after every step (open_clip), or a fixed one (`clip.logit_scale`).
- `tinyclip`: affinity mimicking (microsoft/Cream TinyCLIP) from a frozen `teacher` CLIP into a student:
  L = 0.5·α·w·(L_I2T + L_T2I) + (1−α)·w·InfoNCE, α = w = 1 by default (pure affinity mimicking). The student
  starts from the teacher's weights (`clip.init: inherit`, manual inheritance: layers at a fixed step, leading
  slices), from `pretrained`, or from scratch. With `clip.auto: true` (automatic inheritance) the student keeps
  its architecture (default: the teacher's) and learns hard-concrete masks over heads, MLP units and hidden
  channels, pushed to `target_sparsity` by a Lagrangian whose multipliers ascend; the masks and multipliers
  have their own optimizer (the reference's learning rates) and are checkpointed with the run. Evaluation then
  scores the pruned model (`prune`: exactly the masked model's outputs); `prune_checkpoint` / `vitnas
  prune-clip` write it as a plain CLIP checkpoint, which the next progressive stage takes as `pretrained`.

Where this differs from the reference, on purpose: the masks are never fused mid-run (the reference prunes at
`prune_step` and trains on): a stage ends with its masked model and the next stage starts from the pruned one,
with a target relative to that stage's starting model; the mask learning rates stay constant within a stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitnas._config import check_fields, check_range, from_known_keys
from vitnas.checkpoint import read_checkpoint, read_metadata, save_checkpoint
from vitnas.data.augment import AugmentConfig, BatchAugment
from vitnas.data.datasets import ImageData, Split, load_data
from vitnas.data.image_text import (
    CIFAR10_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    IMAGENET_TEMPLATES,
    CaptionStream,
    ShardStream,
    caption_choices,
    fill_template,
    is_pairs,
    is_shards,
    read_csv_pairs,
    readable_classname,
)
from vitnas.data.tokenizer import tokenize
from vitnas.distill.affinity import clip_loss, tinyclip_loss
from vitnas.models.clip import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    CLIPConfig,
    config_from_state_dict,
    convert_tinyclip_state_dict,
    load_clip_weights,
)
from vitnas.models.clip_inherit import TOWERS, L0Masks, inherit_manual, prune
from vitnas.models.registry import create_model, list_models
from vitnas.models.spec import load_model, spec_of
from vitnas.models.weights import read_state_dict
from vitnas.train.tasks.base import Augment, Batch, StepResult, Task, TaskContext, register_task
from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

__all__ = [
    "TEMPLATE_SETS",
    "ClipConfig",
    "ClipTask",
    "TinyClipTask",
    "class_prompts",
    "clip_config_of",
    "load_clip",
    "prunable_params",
    "prune_checkpoint",
    "stage_target",
]

log = logging.getLogger(__name__)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "cifar10": CIFAR10_TEMPLATES,
    "digits": DIGIT_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
}
INITS = ("auto", "inherit", "scratch")
MAX_LOGIT_SCALE = 100.0  # open_clip clamps the learnable scale at log(100)


@dataclass
class ClipConfig:
    templates: str = "auto"  # prompts: auto (the digits' for the digits, else cifar10) | cifar10 | digits | imagenet
    context_length: int | None = None  # caption tokens (null: the model's context, 77); class prompts fit in 16-24
    logit_scale: float | None = None  # fixed logit scale (TinyCLIP's scripts: 50, both models); null: learned, <= 100
    alpha: float = 1.0  # tinyclip: share of affinity mimicking; 1 - alpha goes to the student's own InfoNCE
    weight: float = 1.0  # tinyclip: w, the weight of the whole distillation loss
    init: str = "auto"  # tinyclip student: auto (pretrained if set, else inherit) | inherit (teacher's) | scratch
    auto: bool = False  # tinyclip: automatic inheritance (learned structured masks on the student; prune afterwards)
    towers: str = "both"  # auto: the towers masked: both | visual | text
    target_sparsity: float = 0.5  # auto: share of the student's prunable parameters to remove
    start_sparsity: float = 0.0  # auto: the target at step 0, rising linearly to target_sparsity
    sparsity_warmup: int = 1000  # auto: steps over which the target rises (reference 1000)
    mask_lr: float = 0.02  # auto: Adam lr of the masks' log-alpha (reference 0.02)
    lambda_lr: float = 0.02  # auto: ascent rate of the Lagrange multipliers (the reference's lr -0.02)
    init_lambda: float = 10.0  # auto: initial Lagrange multipliers (reference 10)
    csv_separator: str = (
        "auto"  # data_path a .csv / .tsv of (image, caption): auto (',' for .csv, tab for .tsv) | a char
    )
    csv_img_key: str = "filepath"  # CSV column of image paths (relative to the CSV's folder); open_clip's default
    csv_caption_key: str = "title"  # CSV column of captions; open_clip's default
    eval_data: str | None = None  # CSV / shard training: zero-shot images, a class folder or 'digits'; null: none
    shuffle_buffer: int = 1000  # shard training: samples in the seeded shuffle buffer of each loader worker
    num_samples: int | None = None  # shard training: samples per epoch when no sizes.json lies beside the shards

    def __post_init__(self) -> None:
        source = "clip"
        check_fields(self, source)
        if self.templates not in ("auto", *TEMPLATE_SETS):
            raise ValueError(f"clip: templates={self.templates!r}; expected auto or one of {sorted(TEMPLATE_SETS)}")
        if self.init not in INITS:
            raise ValueError(f"clip: init={self.init!r}; expected one of {INITS}")
        if self.towers not in ("both", *TOWERS):
            raise ValueError(f"clip: towers={self.towers!r}; expected both, visual or text")
        check_range(source, "context_length", self.context_length, 2)
        check_range(source, "logit_scale", self.logit_scale, 0.0, strict_lo=True)
        check_range(source, "alpha", self.alpha, 0.0, 1.0)
        check_range(source, "target_sparsity", self.target_sparsity, 0.0, 1.0)
        check_range(source, "start_sparsity", self.start_sparsity, 0.0, self.target_sparsity)
        for name in ("weight", "mask_lr", "lambda_lr", "init_lambda"):
            check_range(source, name, getattr(self, name), 0.0)
        check_range(source, "sparsity_warmup", self.sparsity_warmup, 0)
        check_range(source, "shuffle_buffer", self.shuffle_buffer, 1)
        check_range(source, "num_samples", self.num_samples, 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClipConfig:
        return from_known_keys(cls, data, "clip")

    def mask_towers(self) -> tuple[str, ...]:
        return TOWERS if self.towers == "both" else (self.towers,)


# -- models ----------------------------------------------------------------------------------------
def _registered_clip(name: str, model_args: dict[str, Any], img_size: int | None, *, meta: bool = False) -> CLIP:
    """create_model(name, **model_args) at `img_size` (merged into the vision tower's options), checked to be
    a CLIP; on the meta device when only its config is wanted."""
    with torch.device("meta"):
        probe = create_model(name, **model_args)
    if not isinstance(probe, CLIP):
        raise ValueError(
            f"model={name!r} is a {type(probe).__name__}, not a CLIP; CLIP models: {list_models('*clip*')}"
        )
    kwargs = dict(model_args)
    if img_size is not None:
        kwargs["vision"] = {**kwargs.get("vision", {}), "image_size": img_size}
    with torch.device("meta" if meta else "cpu"):
        return create_model(name, **kwargs)


def load_clip(source: str | Path, weights: str | Path | None = None) -> tuple[CLIP, dict[str, Any]]:
    """(a CLIP in eval mode, a description of where it came from). `source`: a registered CLIP name (weights
    from `weights`, an open_clip / TinyCLIP file, or fresh), a vitnas checkpoint holding a CLIP (`clip` /
    `tinyclip` runs, `prune-clip` output), or an open_clip / TinyCLIP weights file (architecture read from its
    shapes: head width 64, GELU, as TinyCLIP's). Files are read without unpickling code."""
    name = str(source)
    if name in list_models():
        model = _registered_clip(name, {}, None)
        if weights:
            load_clip_weights(model, weights)
        return model.eval(), {"source": name, "weights": str(weights) if weights else None}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not a registered CLIP model nor a file (CLIP models: {list_models('*clip*')})"
        )
    if weights:
        raise ValueError(f"teacher_weights={weights!r} is for a registered teacher model; {path} holds its own weights")
    if path.suffix == ".safetensors":
        try:
            kind = read_metadata(path)["model"]["kind"]
        except ValueError:
            kind = None  # a plain safetensors file (open_clip layout)
        if kind is not None:
            model, _ = load_model(path)
            if not isinstance(model, CLIP):
                raise ValueError(f"{path}: holds a {kind!r} model, not a CLIP")
            return model, {"source": str(path)}
    sd = convert_tinyclip_state_dict(read_state_dict(path))
    model = CLIP(config_from_state_dict(sd))
    load_clip_weights(model, sd)
    return model.eval(), {"source": str(path)}


def clip_config_of(source: str | Path) -> CLIPConfig:
    """The architecture of a CLIP without building it: a registered CLIP's config, a vitnas checkpoint's model
    spec, or (an open_clip / TinyCLIP weights file) read from the state dict's shapes."""
    if str(source) in list_models():
        return _registered_clip(str(source), {}, None, meta=True).config
    path = Path(source)
    try:
        spec = read_metadata(path)["model"]
    except ValueError:  # not a vitnas checkpoint: an open_clip-layout weights file
        return config_from_state_dict(convert_tinyclip_state_dict(read_state_dict(path)))
    if spec.get("kind") != "clip":
        raise ValueError(f"{path}: holds a {spec.get('kind')!r} model, not a CLIP")
    return CLIPConfig.from_dict(spec["config"])


def class_prompts(classes: list[str], *, digits: bool, templates: str = "auto") -> tuple[list[str], tuple[str, ...]]:
    """(readable class names, prompt templates) of class-labelled data: the bundled digits read as 'zero'..
    'nine' with DIGIT_TEMPLATES, folders by their names ('pickup_truck' -> 'pickup truck') with CIFAR-10's."""
    names = list(DIGIT_NAMES) if digits else [readable_classname(c) for c in classes]
    key = ("digits" if digits else "cifar10") if templates == "auto" else templates
    return names, TEMPLATE_SETS[key]


def _number(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


# -- the contrastive task --------------------------------------------------------------------------
@register_task("clip")
class ClipTask(Task):
    """Contrastive CLIP training of `model` (+ `model_args`) on prompt captions of class-labelled images."""

    resume_keys = ("model", "model_args", "pretrained", "clip")
    best_metric = "val_top1"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.clip = ClipConfig.from_dict(cfg.clip)
        self._check_config()
        self.classnames: list[str] = []
        self.templates: tuple[str, ...] = ()
        self.tokens: torch.Tensor | None = None  # (templates x classes, context): row t * C + c
        self.val, self.num_train, self.context_length = None, 0, 0
        self.pairs = False  # trained on image-caption pairs (CSV / shards), not prompts over class labels
        self.captions: list[str] | None = None  # CSV training: the caption of each training row
        self._choices: tuple[int, np.ndarray] | None = None  # (epoch, caption_choices of that epoch)

    def _check_config(self) -> None:
        if not self.cfg.model:
            raise ValueError(
                f"task {self.name!r}: set model (a registered CLIP, e.g. clip_tiny; `vitnas models '*clip*'`)"
            )
        if self.cfg.teacher:
            raise ValueError(f"task {self.name!r} trains from scratch: teacher={self.cfg.teacher!r} is for tinyclip")

    def model_config(self) -> CLIPConfig:
        """The CLIP this run trains (built on the meta device: only its config is read)."""
        return _registered_clip(self.cfg.model, self.cfg.model_args, self.cfg.img_size, meta=True).config

    def img_size(self) -> int:
        return self.cfg.img_size or self.model_config().vision.image_size

    def text_context(self) -> int:
        """The longest caption every text tower of the run takes."""
        return self.model_config().text.context_length

    def norm_override(self) -> dict[str, Any]:
        return {"mean": CLIP_MEAN, "std": CLIP_STD, "mixup": 0.0, "cutmix": 0.0}

    def load_data(self, img_size: int) -> ImageData | None:
        """Image-caption pairs named by `data_path`: a .csv / .tsv of (image path, caption) rows (open_clip's
        CsvDataset layout) as an indexed training split whose labels are the row numbers, or webdataset shards
        streamed (`CaptionStream`: the captions travel with each batch). Validation and test are `eval_data`'s
        labelled splits (zero-shot), or empty. Anything else: None, the trainer's class-labelled images."""
        cfg, c = self.cfg, self.clip
        if not is_pairs(cfg.data_path):
            return None
        self.pairs = True
        train = self._pairs_split(img_size)
        name = "shards" if isinstance(train, CaptionStream) else Path(cfg.data_path).stem
        if c.eval_data is None:
            log.info("%s: %d pairs; no eval_data, so no zero-shot evaluation", cfg.data_path, len(train))
            empty = Split(
                torch.zeros(0, dtype=torch.long), images=torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
            )
            return ImageData(name, [], train, empty, empty)
        ev = load_data(
            None if c.eval_data == "digits" else c.eval_data,
            img_size=img_size,
            val_per_class=cfg.val_per_class,
            seed=cfg.seed,
            skip_bad=cfg.skip_bad_images,
            workers=cfg.workers,
        )
        log.info("%s: %d pairs; zero-shot evaluation on %s", cfg.data_path, len(train), ev.summary())
        return ImageData(name, ev.classes, train, ev.val, ev.test)

    def _pairs_split(self, img_size: int) -> Split | CaptionStream:
        """The training pairs of `data_path`: shards as a stream, a CSV's rows as an indexed split (their
        captions kept in `self.captions`, looked up by index)."""
        cfg, c = self.cfg, self.clip
        if is_shards(cfg.data_path):
            shards = ShardStream(
                cfg.data_path,
                size=img_size,
                skip_bad=cfg.skip_bad_images,
                shuffle_buffer=c.shuffle_buffer,
                workers=cfg.workers,
                num_samples=c.num_samples,
            )
            return CaptionStream(shards)
        path = Path(cfg.data_path)
        sep = c.csv_separator if c.csv_separator != "auto" else ("," if path.suffix.lower() == ".csv" else "\t")
        pairs = read_csv_pairs(
            path,
            size=img_size,
            sep=sep,
            img_key=c.csv_img_key,
            caption_key=c.csv_caption_key,
            skip_bad=cfg.skip_bad_images,
            workers=cfg.workers,
        )
        self.captions = pairs.captions
        return Split(torch.arange(len(pairs)), paths=pairs.paths, load_size=img_size, workers=cfg.workers)

    def prepare_data(self, data: Any) -> None:
        """Class names and prompts of the data (of `eval_data` under CSV training); every (template, class) prompt
        tokenized once."""
        from_digits = self.clip.eval_data == "digits" if self.pairs else self.cfg.data_path is None
        digits = from_digits and list(data.classes) == [str(i) for i in range(10)]
        self.classnames, self.templates = class_prompts(
            list(data.classes), digits=digits, templates=self.clip.templates
        )
        cap = self.text_context()
        length = self.clip.context_length or cap
        if length > cap:
            raise ValueError(f"clip: context_length={length} exceeds the text tower's {cap} positions")
        self.context_length = length
        texts = [fill_template(t, c) for t in self.templates for c in self.classnames]
        self.tokens = tokenize(texts, length)
        self.val, self.num_train = data.val, len(data.train)
        log.info(
            "captions: %d classes x %d templates, %d tokens each", len(self.classnames), len(self.templates), length
        )

    def build_augment(self, cfg: AugmentConfig, img_size: int, num_classes: int) -> Augment:
        """The recipe's image augmentation; the targets are the class labels (they pick the captions)."""
        augment = BatchAugment(cfg, img_size, 1)
        return lambda images, labels, index, epoch: (augment(images, torch.zeros_like(labels))[0], labels)

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        return _registered_clip(self.cfg.model, self.cfg.model_args, self.cfg.img_size)

    # -- a step
    def caption_tokens(self, batch: Batch) -> torch.Tensor:
        """The token rows of the batch's captions: template of (index, epoch, seed), class from the label (CSV
        training: the rows' own captions; shards: the captions streamed with the batch). A batch without
        dataset indices draws its templates from the step's seeded RNG."""
        if "captions" in batch.extras:
            return tokenize(batch.extras["captions"], self.context_length).to(batch.images.device)
        if self.captions is not None:
            if batch.index is None:
                raise ValueError("CSV captions are looked up by dataset index: pass `index` to train_step")
            return tokenize([self.captions[i] for i in batch.index], self.context_length).to(batch.images.device)
        n_templates, n_classes = len(self.templates), len(self.classnames)
        if batch.index is None:
            choice = torch.randint(n_templates, (batch.labels.shape[0],))
        else:
            if self._choices is None or self._choices[0] != batch.epoch:
                n = self.num_train
                self._choices = (batch.epoch, caption_choices(n, n_templates, seed=self.cfg.seed, epoch=batch.epoch))
            choice = torch.as_tensor(self._choices[1][np.asarray(batch.index)])
        rows = choice * n_classes + batch.labels.cpu()
        return self.tokens[rows].to(batch.images.device)

    def _scale(self, model: CLIP, learned: torch.Tensor) -> torch.Tensor | float:
        """The logit scale of the step: the fixed one (also written into the model), else the learned one."""
        if self.clip.logit_scale is None:
            return learned
        with torch.no_grad():
            model.logit_scale.fill_(math.log(self.clip.logit_scale))
        return self.clip.logit_scale

    def loss(self, batch: Batch) -> StepResult:
        tokens = self.caption_tokens(batch)
        with self.ctx.autocast():
            img, txt, scale = self.model(batch.images, tokens)
        scale = self._scale(self.model, scale)
        loss = clip_loss(img, txt, scale)
        self.ctx.backward(loss)
        return StepResult(loss.detach(), metrics={"logit_scale": _number(scale)})

    def after_step(self) -> None:
        """open_clip's clamp of the learnable scale, after the optimizer moved it."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    # -- evaluation and checkpoints
    def zeroshot(self, model: nn.Module) -> dict[str, float]:
        """Zero-shot top-1 / top-5 of `model` on the validation split, with the training prompts; each rank
        scores its share of the images and the counts are summed."""
        ctx = self.ctx
        tok = lambda texts: tokenize(texts, self.context_length)  # noqa: E731
        classifier = zeroshot_classifier(model, self.classnames, self.templates, tok, ctx.device)
        return evaluate_zeroshot(
            model,
            self.val,
            classifier,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            img_size=self.img_size(),
            batch_size=self.cfg.eval_batch_size,
            device=ctx.device,
            rank=ctx.rank,
            world=ctx.world,
            reduce=ctx.all_reduce_sum,
            amp_dtype=ctx.amp_dtype,
        )

    def evaluate(self) -> dict[str, float]:
        if not self.classnames:  # CSV training without eval_data
            return {}
        r = self.zeroshot(self.model)
        return {"val_top1": r["top1"], "val_top5": r["top5"]}

    def checkpoint_meta(self) -> dict[str, Any]:
        """What zero-shot evaluation of the checkpoint needs: class names, prompts, caption length."""
        return {
            "clip": {
                "classnames": self.classnames,
                "templates": list(self.templates),
                "context_length": self.context_length,
            }
        }


# -- TinyCLIP distillation -------------------------------------------------------------------------
@register_task("tinyclip")
class TinyClipTask(ClipTask):
    """Affinity mimicking from a frozen `teacher` CLIP into a student: `model` (+ `model_args`), else the
    architecture of `pretrained`, else (automatic inheritance) the teacher's."""

    owns_teacher = True
    resume_keys = ClipTask.resume_keys + ("teacher", "teacher_weights")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.teacher, self.teacher_info = load_clip(cfg.teacher, cfg.teacher_weights)
        self.teacher.requires_grad_(False)
        self.masks: L0Masks | None = None
        self.mask_opt: torch.optim.Optimizer | None = None
        self.teacher_scores: dict[str, float] | None = None
        self.student_config = self._student_config()
        t_size, s_size = self.teacher.config.vision.image_size, self.student_config.vision.image_size
        if cfg.img_size and cfg.img_size != s_size:
            raise ValueError(
                f"tinyclip: img_size={cfg.img_size}, but the student taken from "
                f"{cfg.pretrained or cfg.teacher} is built for {s_size}px; leave img_size unset"
            )
        if t_size != s_size:
            raise ValueError(
                f"tinyclip: the teacher {cfg.teacher} sees {t_size}px images, the student {s_size}px; both must "
                f"see the same batch (set img_size to {t_size} or build the student at the teacher's size)"
            )

    def _check_config(self) -> None:
        cfg, c = self.cfg, self.clip
        if not cfg.teacher:
            raise ValueError(
                "task tinyclip: set teacher (a clip checkpoint, a CLIP weights file, or a registered CLIP)"
            )
        if cfg.distill_logits:
            raise ValueError("task tinyclip distils a live teacher; distill_logits does not apply")
        if not (cfg.model or cfg.pretrained or c.auto):
            raise ValueError(
                "task tinyclip: set model (the student, a registered CLIP), or pretrained (a CLIP checkpoint whose "
                "architecture it keeps), or clip auto=true (the student is the teacher, masked)"
            )
        if c.init == "inherit" and cfg.pretrained:
            raise ValueError(
                f"clip: init=inherit takes the teacher's weights; pretrained={cfg.pretrained!r} gives others"
            )

    def _student_config(self) -> CLIPConfig:
        cfg = self.cfg
        if cfg.model:
            return _registered_clip(cfg.model, cfg.model_args, cfg.img_size, meta=True).config
        if cfg.pretrained:
            return clip_config_of(cfg.pretrained)
        return CLIPConfig.from_dict(self.teacher.config.to_dict())

    def model_config(self) -> CLIPConfig:
        return self.student_config

    def text_context(self) -> int:
        return min(self.student_config.text.context_length, self.teacher.config.text.context_length)

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        cfg, c = self.cfg, self.clip
        if c.init == "inherit" or (c.init == "auto" and not cfg.pretrained):
            model = inherit_manual(self.teacher, self.student_config)
        else:  # scratch, or pretrained weights the trainer loads next
            model = CLIP(self.student_config)
        self.teacher.to(ctx.device)
        if c.auto:
            if ctx.amp_dtype == torch.float16:
                raise ValueError("clip auto=true steps its masks on unscaled gradients: use amp bf16 or off, not fp16")
            self.masks = L0Masks(
                self.student_config,
                target_sparsity=c.target_sparsity,
                start_sparsity=c.start_sparsity,
                warmup_steps=c.sparsity_warmup,
                init_lambda=c.init_lambda,
                towers=c.mask_towers(),
            ).to(ctx.device)
        return model

    def extra_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        if self.masks is None:
            return {}
        groups = self.masks.param_groups(mask_lr=self.clip.mask_lr, lambda_lr=-self.clip.lambda_lr)
        self.mask_opt = torch.optim.AdamW(groups, lr=self.clip.mask_lr)
        return {"masks": self.mask_opt}

    def loss(self, batch: Batch) -> StepResult:
        c, ctx, model = self.clip, self.ctx, self.model
        tokens = self.caption_tokens(batch)
        with torch.no_grad(), ctx.autocast():
            t_img, t_txt, t_scale = self.teacher(batch.images, tokens)
        masks = self.masks() if self.masks is not None else None
        with ctx.autocast():
            s_img, s_txt, s_scale = model(batch.images, tokens, masks)
        s_scale = self._scale(model, s_scale)
        t_scale = c.logit_scale if c.logit_scale is not None else t_scale
        loss = tinyclip_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, alpha=c.alpha, weight=c.weight)
        metrics = {"logit_scale": _number(s_scale)}
        if self.masks is None:
            ctx.backward(loss)
            return StepResult(loss.detach(), metrics=metrics)
        penalty, expected, target = self.masks.lagrangian(batch.step)
        ctx.backward(loss + penalty)
        self._mask_step()
        metrics.update(expected_sparsity=float(expected), target_sparsity=target, lambda_1=_number(self.masks.lambda_1))
        return StepResult((loss + penalty).detach(), metrics=metrics)

    def _mask_step(self) -> None:
        """Average the masks' and multipliers' gradients over the ranks, step them (λ ascends), clamp log α."""
        params = [p for p in self.masks.parameters() if p.grad is not None]
        self.ctx.all_reduce_mean([p.grad for p in params])
        self.mask_opt.step()
        self.mask_opt.zero_grad(set_to_none=True)
        self.masks.constrain_()

    def evaluate(self) -> dict[str, float]:
        """Zero-shot scores of the student (pruned, under automatic inheritance: exactly the masked model) and,
        once per run, of the teacher."""
        if not self.classnames:  # CSV training without eval_data
            return {}
        if self.teacher_scores is None:
            self.teacher_scores = self.zeroshot(self.teacher)
        out: dict[str, float] = {}
        student: nn.Module = self.model
        if self.masks is not None:
            student = prune(self.model, self.masks).eval()
            out["expected_sparsity"] = _number(self.masks.expected_sparsity())
            n_all = sum(p.numel() for p in self.model.parameters())
            out["params_kept"] = sum(p.numel() for p in student.parameters()) / n_all
        r = self.zeroshot(student)
        return {"val_top1": r["top1"], "val_top5": r["top5"], "teacher_val_top1": self.teacher_scores["top1"], **out}

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["teacher"] = {**self.teacher_info, "model": spec_of(self.teacher)}
        if self.masks is not None:
            meta["clip"]["masks"] = {"towers": list(self.clip.mask_towers()), "config": self.student_config.to_dict()}
        return meta

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.masks is None:
            return {}
        return {f"masks.{k}": v.detach().clone() for k, v in self.masks.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if self.masks is None:
            return
        with torch.no_grad():
            for k, v in self.masks.state_dict().items():
                v.copy_(tensors[f"masks.{k}"])


# -- progressive automatic inheritance -------------------------------------------------------------
def prunable_params(config: CLIPConfig, towers: tuple[str, ...] = TOWERS) -> int:
    """Parameters of a CLIP of `config` that the masks of `towers` count and can remove (attention and MLP)."""
    return sum(t.prunable() for t in L0Masks(config, towers=towers).towers.values())


def stage_target(teacher: CLIPConfig, start: CLIPConfig, sparsity: float, towers: tuple[str, ...] = TOWERS) -> float:
    """The target sparsity of a progressive stage, relative to the model it starts from (`start`: the teacher, or
    the previous stage's pruned model), that leaves `1 - sparsity` of the *teacher's* prunable parameters:
    TinyCLIP's progressive 0.25 -> 0.5 -> 0.75 are shares of the teacher."""
    t, s = prunable_params(teacher, towers), prunable_params(start, towers)
    target = 1.0 - (1.0 - sparsity) * t / s
    if target < 0:
        raise ValueError(
            f"a stage to sparsity {sparsity} of the teacher starts from a model that keeps only {s / t:.3f} of the "
            "teacher's prunable parameters: the stages' sparsities must increase"
        )
    return target


# -- pruning a finished automatic-inheritance stage -------------------------------------------------
def masks_of_checkpoint(path: str | Path) -> tuple[CLIP, L0Masks, dict[str, Any]]:
    """(the student CLIP, its learned masks, the metadata) of a `tinyclip` checkpoint with clip auto=true."""
    groups, meta = read_checkpoint(path, only=("model", "task"))
    info = meta.get("clip", {}).get("masks")
    if meta.get("task") != "tinyclip" or info is None:
        raise ValueError(f"{path}: not a tinyclip checkpoint with learned masks (clip auto=true); nothing to prune")
    model, _ = load_model(path)
    masks = L0Masks(CLIPConfig.from_dict(info["config"]), towers=info["towers"])
    if any(f"masks.{k}" not in groups["task"] for k in masks.state_dict()):
        raise ValueError(f"{path}: the masks' tensors are missing (a checkpoint saved without its task state?)")
    masks.load_state_dict({k: groups["task"][f"masks.{k}"] for k in masks.state_dict()}, strict=True)
    return model, masks.eval(), meta


def prune_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Prune the masked student of a finished automatic-inheritance stage and write `out_dir/pruned.safetensors`:
    a plain CLIP checkpoint (model spec kind "clip", the run's data and prompt metadata) that `load_model`,
    `vitnas evaluate-zeroshot` and the next stage's `pretrained` read."""
    model, masks, meta = masks_of_checkpoint(path)
    pruned = prune(model, masks).eval()
    n_before, n_after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    out = Path(out_dir) / "pruned.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = ("config", "classes", "val_images", "img_size", "norm", "clip", "teacher", "step", "epoch")
    info = {"source": str(path), "params_before": n_before, "params_after": n_after}
    new_meta = {
        **{k: meta[k] for k in keep if k in meta},
        "task": "prune-clip",
        "model": spec_of(pruned),
        "pruned": info,
    }
    new_meta["clip"] = {k: v for k, v in meta.get("clip", {}).items() if k != "masks"}
    save_checkpoint(out, weights=pruned.state_dict(), meta=new_meta)
    log.info("%s: pruned %.2fM -> %.2fM parameters, written to %s", path, n_before / 1e6, n_after / 1e6, out)
    return out
