"""Augmentation that can be replayed image by image (TinyViT's fast distillation).

Every random choice for an image — crop box, flip, RandAugment ops, erased box, whether and how it
is mixed, the mixing lambda and cutmix box — is drawn from that image's own seed, never from a batch
or a global RNG. The teacher that writes a logit store and the student that reads it therefore see
exactly the same image, whatever the batch size, batch composition, number of workers or ranks.

Mixing pairs each image with a partner fixed per epoch (`mix_partners`, a pure function of the seed,
the epoch and the number of images), loaded beside it, instead of timm's "the flipped batch": the
pairing then does not depend on which images happen to share a batch. The ops follow
`BatchAugment` (timm's RandomResizedCrop and RandomErasing algorithms, kornia's RandAugment run under
the image's seed), applied batched from the per-image parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitnas.data.augment import AugmentConfig, _normalize, mix_targets

__all__ = ["ReplayAugment", "SampleParams", "draw_params", "mix_partners", "sample_seeds"]

Box = tuple[int, int, int, int]  # top, left, height, width in pixels


def sample_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    """The augmentation seed (int32 >= 0) of each of `n` images in `epoch`, indexed by image."""
    return np.random.default_rng([seed, epoch, 60013]).integers(0, 2**31 - 1, size=n, dtype=np.int64).astype(np.int32)


def mix_partners(seed: int, epoch: int, n: int) -> np.ndarray:
    """The image each image is mixed with in `epoch`: its successor on a seeded cycle through all
    images (never itself when n > 1)."""
    order = np.random.default_rng([seed, epoch, 70001]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


@dataclass(frozen=True)
class SampleParams:
    """One image's draws. `crop`: the source box; `erase`: the box zeroed after normalisation;
    `mix`: "none" | "mixup" | "cutmix" with `lam` (the kept fraction) and the cutmix `cut` box."""

    crop: Box
    flip: bool
    randaugment_seed: int
    erase: Box | None
    mix: str
    lam: float
    cut: Box | None


def _resized_crop(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float]) -> Box:
    """timm's RandomResizedCrop.get_params: 10 tries at a random area and log-uniform aspect ratio in
    [3/4, 4/3], then the centre crop at the nearest legal ratio."""
    area = h * w
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _erase_box(rng: np.random.Generator, h: int, w: int) -> Box | None:
    """timm's RandomErasing box: area 2%-33%, log-uniform aspect in [0.3, 3.3], 10 tries."""
    for _ in range(10):
        target = h * w * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            return int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew
    return None


def _cut_box(rng: np.random.Generator, size: int, lam: float) -> tuple[Box, float]:
    """timm's rand_bbox: a box of (1 - lam) of the area around a uniform centre, clipped; lam is then
    corrected to the area actually kept."""
    cut = math.sqrt(1 - lam)
    ch = cw = int(size * cut)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, size)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, size)
    return (y0, x0, y1 - y0, x1 - x0), 1 - (y1 - y0) * (x1 - x0) / (size * size)


def draw_params(cfg: AugmentConfig, seed: int, h: int, w: int, img_size: int) -> SampleParams:
    """Everything random about one image of size h x w, from its seed alone (numpy PCG64)."""
    rng = np.random.default_rng(int(seed))
    scale = tuple(cfg.crop_scale)
    crop = _resized_crop(rng, h, w, scale) if scale != (1.0, 1.0) else (0, 0, h, w)
    flip = cfg.hflip > 0 and rng.random() < cfg.hflip
    ra_seed = int(rng.integers(0, 2**31 - 1))
    erase = _erase_box(rng, img_size, img_size) if cfg.erase_prob > 0 and rng.random() < cfg.erase_prob else None
    mix, lam, cut = "none", 1.0, None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and rng.random() < cfg.mix_prob:
        use_cut = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < cfg.switch_prob)
        alpha = cfg.cutmix if use_cut else cfg.mixup
        lam = float(rng.beta(alpha, alpha))
        mix = "cutmix" if use_cut else "mixup"
        if use_cut:
            cut, lam = _cut_box(rng, img_size, lam)
    return SampleParams(crop, bool(flip), ra_seed, erase, mix, lam, cut)


def _box_mask(boxes: Sequence[Box | None], size: int, device: torch.device) -> Tensor:
    """(B, 1, size, size) bool: True inside each image's box (nowhere for None)."""
    t = torch.tensor([b if b is not None else (0, 0, 0, 0) for b in boxes], device=device)
    r = torch.arange(size, device=device)
    rows = (r[None] >= t[:, :1]) & (r[None] < t[:, :1] + t[:, 2:3])
    cols = (r[None] >= t[:, 1:2]) & (r[None] < t[:, 1:2] + t[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :])[:, None]


class ReplayAugment:
    """uint8 images + labels + per-image seeds -> normalized float images + soft targets; the same
    seeds give the same images in any batch. Mixing needs each image's partner (`mix_partners`)."""

    def __init__(self, cfg: AugmentConfig, img_size: int, num_classes: int) -> None:
        self.cfg = cfg
        self.img_size = img_size
        self.num_classes = num_classes
        self.randaugment = None
        if cfg.randaugment_n > 0:
            import kornia.augmentation as K

            self.randaugment = K.auto.RandAugment(n=cfg.randaugment_n, m=cfg.randaugment_m)

    @property
    def mixes(self) -> bool:
        return (self.cfg.mixup > 0 or self.cfg.cutmix > 0) and self.cfg.mix_prob > 0

    def params(self, seeds: Sequence[int], h: int, w: int) -> list[SampleParams]:
        return [draw_params(self.cfg, int(s), h, w, self.img_size) for s in seeds]

    def _geometric(self, images: Tensor, params: list[SampleParams]) -> Tensor:
        """Crop each image's box, flip it if drawn, resize to img_size bilinearly: one affine grid_sample."""
        b, _, h, w = images.shape
        x = images.float().div_(255)
        crop = torch.tensor([p.crop for p in params], dtype=torch.float32, device=x.device)
        flip = torch.tensor([-1.0 if p.flip else 1.0 for p in params], device=x.device)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = crop[:, 3] / w * flip
        theta[:, 0, 2] = (2 * crop[:, 1] + crop[:, 3]) / w - 1
        theta[:, 1, 1] = crop[:, 2] / h
        theta[:, 1, 2] = (2 * crop[:, 0] + crop[:, 2]) / h - 1
        size = (b, 3, self.img_size, self.img_size)
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _randaugment(self, x: Tensor, params: list[SampleParams]) -> Tensor:
        out = []
        devices = [x.device] if x.device.type == "cuda" else []
        for i, p in enumerate(params):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(p.randaugment_seed)
                out.append(self.randaugment(x[i : i + 1]))
        return torch.cat(out).clamp_(0, 1)

    def images(self, images: Tensor, params: list[SampleParams]) -> Tensor:
        """Cropped, flipped, RandAugmented, normalized and erased images, before mixing."""
        x = self._geometric(images, params)
        if self.randaugment is not None:
            x = self._randaugment(x, params)
        x = _normalize(x.clamp_(0, 1), self.cfg)
        if any(p.erase is not None for p in params):
            x = x.masked_fill(_box_mask([p.erase for p in params], self.img_size, x.device), 0.0)
        return x

    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        seeds: Sequence[int],
        partner_images: Tensor | None = None,
        partner_labels: Tensor | None = None,
        partner_seeds: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        h, w = images.shape[-2:]
        params = self.params(seeds, h, w)
        x = self.images(images, params)
        targets = mix_targets(labels.to(x.device), self.num_classes, self.cfg.label_smoothing)
        if not any(p.mix != "none" for p in params):
            return x, targets
        if partner_images is None or partner_labels is None or partner_seeds is None:
            raise ValueError("this recipe mixes images: pass each image's partner (images, labels, seeds)")
        xp = self.images(partner_images, self.params(partner_seeds, *partner_images.shape[-2:]))
        yp = mix_targets(partner_labels.to(x.device), self.num_classes, self.cfg.label_smoothing)
        lam = torch.tensor([p.lam for p in params], device=x.device)
        is_mixup = torch.tensor([p.mix == "mixup" for p in params], device=x.device)
        cut = _box_mask([p.cut if p.mix == "cutmix" else None for p in params], self.img_size, x.device)
        blend = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * xp
        x = torch.where(is_mixup.view(-1, 1, 1, 1), blend, torch.where(cut, xp, x))
        targets = lam[:, None] * targets + (1 - lam[:, None]) * yp
        return x, targets


def replay_from_split(
    aug: ReplayAugment,
    split,
    index: np.ndarray,
    images: Tensor,
    labels: Tensor,
    seeds: np.ndarray,
    partners: np.ndarray | None,
    partner_seeds: np.ndarray | None,
) -> tuple[Tensor, Tensor]:
    """`aug` on a batch of `split` (images `index`, seeds `seeds`), loading each image's mixing partner
    (`partners[i]`, seeded `partner_seeds[i]`) from the split when the recipe mixes."""
    if not aug.mixes:
        return aug(images, labels, seeds)
    if partners is None or partner_seeds is None:
        raise ValueError("this recipe mixes images: pass each image's partner and the partner's seed")
    partner_images, partner_labels = split.take(np.asarray(partners))
    return aug(images, labels, seeds, partner_images.to(images.device), partner_labels, partner_seeds)
