"""Batched augmentation on tensors (on the training device), after the DeiT / AutoFormer recipe.

Geometric and photometric ops come from kornia; mixup / cutmix and label smoothing produce soft
targets as timm does. Recipes are named, and every field can be overridden from a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AugmentConfig", "BatchAugment", "RECIPES", "recipe", "mix_targets", "eval_transform"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area range; (1, 1) = off
    hflip: float = 0.5  # horizontal flip probability
    randaugment_n: int = 2  # RandAugment ops per image; 0 = off
    randaugment_m: int = 9  # RandAugment magnitude (0-30)
    mixup: float = 0.8  # mixup Beta alpha; 0 = off
    cutmix: float = 1.0  # cutmix Beta alpha; 0 = off
    mix_prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1
    erase_prob: float = 0.25  # random erasing probability
    repeats: int = 3  # repeated augmentation: each image appears this many times per epoch
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def override(self, **changes: Any) -> AugmentConfig:
        names = {f.name for f in fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"unknown augmentation key {key!r}; expected one of {sorted(names)}")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """The inverse of `to_dict` (e.g. a checkpoint's "norm"); unknown keys are an error."""
        return cls().override(**data)


RECIPES: dict[str, AugmentConfig] = {
    # DeiT / AutoFormer supernet recipe for ImageNet-size images.
    "deit": AugmentConfig(),
    # DeiT's recipe with one view of each image per epoch: what a logit store (save-logits) can replay.
    "tinyvit": replace(AugmentConfig(), repeats=1),
    # 32px images on a small budget: mild crops and flips, light mixing.
    "cifar": AugmentConfig(
        crop_scale=(0.6, 1.0),
        randaugment_n=0,
        mixup=0.2,
        cutmix=0.0,
        mix_prob=0.5,
        erase_prob=0.0,
        repeats=1,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    ),
    # Digits: no flips (a mirrored 2 is not a 2), mild crops.
    "digits": AugmentConfig(
        crop_scale=(0.7, 1.0),
        hflip=0.0,
        randaugment_n=0,
        mixup=0.0,
        cutmix=0.0,
        erase_prob=0.0,
        repeats=1,
        label_smoothing=0.1,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    ),
    "none": AugmentConfig(
        crop_scale=(1.0, 1.0),
        hflip=0.0,
        randaugment_n=0,
        mixup=0.0,
        cutmix=0.0,
        label_smoothing=0.0,
        erase_prob=0.0,
        repeats=1,
    ),
}


def recipe(name: str) -> AugmentConfig:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}") from None


def _normalize(x: Tensor, cfg: AugmentConfig) -> Tensor:
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_transform(images: Tensor, img_size: int, cfg: AugmentConfig) -> Tensor:
    """uint8 (B, 3, H, W) -> normalized float, center-cropped to img_size."""
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    if (h, w) != (img_size, img_size):
        if min(h, w) < img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        else:
            top, left = (h - img_size) // 2, (w - img_size) // 2
            x = x[..., top : top + img_size, left : left + img_size]
    return _normalize(x, cfg)


def mix_targets(
    labels: Tensor, num_classes: int, smoothing: float, lam: float = 1.0, perm: Tensor | None = None
) -> Tensor:
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    y.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    if perm is not None and lam < 1.0:
        y = lam * y + (1.0 - lam) * y[perm]
    return y


class BatchAugment(nn.Module):
    """uint8 images + int labels -> normalized float images + soft targets, for a whole batch."""

    def __init__(self, cfg: AugmentConfig, img_size: int, num_classes: int) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.cfg = cfg
        self.img_size = img_size
        self.num_classes = num_classes
        ops: list[nn.Module] = []
        if tuple(cfg.crop_scale) != (1.0, 1.0):
            ops.append(K.RandomResizedCrop((img_size, img_size), scale=tuple(cfg.crop_scale)))
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.randaugment_n > 0:
            ops.append(K.auto.RandAugment(n=cfg.randaugment_n, m=cfg.randaugment_m))
        self.geometric = nn.Sequential(*ops)
        self.erase = K.RandomErasing(p=cfg.erase_prob) if cfg.erase_prob > 0 else None

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        x = images.float().div_(255)
        if x.shape[-1] != self.img_size and tuple(cfg.crop_scale) == (1.0, 1.0):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        if len(self.geometric):
            x = self.geometric(x).clamp_(0, 1)
        x = _normalize(x, cfg)
        if self.erase is not None:
            x = self.erase(x)
        lam, perm = 1.0, None
        use_mix = (cfg.mixup > 0 or cfg.cutmix > 0) and float(torch.rand(())) < cfg.mix_prob
        if use_mix:
            perm = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)  # pair with the flipped batch, as timm
            cut = cfg.cutmix > 0 and (cfg.mixup <= 0 or float(torch.rand(())) < cfg.switch_prob)
            alpha = cfg.cutmix if cut else cfg.mixup
            lam = float(np.random.default_rng(int(torch.randint(0, 2**31, ()))).beta(alpha, alpha))
            if cut:
                x, lam = _cutmix(x, perm, lam)
            else:
                x = lam * x + (1 - lam) * x[perm]
        return x, mix_targets(labels.to(x.device), self.num_classes, cfg.label_smoothing, lam, perm)


def _cutmix(x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
    h, w = x.shape[-2:]
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (h * w)
