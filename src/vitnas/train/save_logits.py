"""`vitnas save-logits`: run a teacher once per (training image, epoch) over the replayable augmented
training split and keep its top-K probabilities with each image's augmentation seed (TinyViT).

Work is cut into fixed chunks of image indices; each chunk is written whole (temporary file + rename),
so a killed run restarts at the first missing chunk and never writes a record twice. Under torchrun
the chunks are dealt to the ranks (chunk c to rank c mod world), rank 0 writes the manifest and joins
each epoch's chunks into its file. Every record depends only on (seed, epoch, image), and a chunk's
batches are the same whatever the number of ranks, so the bytes of a store do not depend on the world
size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitnas.data.augment import recipe as recipe_of
from vitnas.data.datasets import ImageData, load_data
from vitnas.data.replay import ReplayAugment, mix_partners, replay_from_split, sample_seeds
from vitnas.distill.logit_store import (
    FORMAT,
    FORMAT_VERSION,
    INT16_MAX_CLASSES,
    LogitStore,
    assemble_epoch,
    chunk_file,
    epoch_file,
    record_dtype,
    write_chunk,
    write_manifest,
)
from vitnas.distill.teacher import Teacher, load_teacher
from vitnas.train.dist import DistInfo, barrier, init_distributed
from vitnas.train.runtime import runtime_settings

__all__ = ["SaveLogitsConfig", "save_logits", "store_manifest", "teacher_records"]

log = logging.getLogger(__name__)

# Manifest keys a rerun may change: more epochs extend a store.
EXTENDABLE = ("epochs",)


@dataclass
class SaveLogitsConfig:
    teacher: str = ""  # required: an exported folder, a checkpoint, or a registered model (+ teacher_weights)
    out: str = ""  # required: the store folder (created; an existing store of the same settings is continued)
    teacher_weights: str | None = None  # weights of a registered-model teacher
    teacher_dtype: str = (
        "auto"  # auto (bf16 autocast where amp auto picks it, else fp32) | float32 | bfloat16 | float16
    )
    data_path: str | None = None  # image folders as for training; None = embedded digits
    img_size: int | None = None  # default: the teacher's input size
    val_per_class: int = 100  # must match the student's run: the store covers its training split
    seed: int = 0  # the student run's seed (its validation split) and the augmentation seeds
    recipe: str = "cifar"  # augmentation recipe the student will train with
    augment: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's fields
    epochs: int = 10  # epochs of augmentation to store (the student's epochs)
    topk: int = 10  # probabilities kept per image
    batch_size: int = 256  # teacher batch
    chunk_size: int = 2048  # images per atomically written chunk (the resume granularity)
    threads: int | None = None  # torch CPU threads

    def __post_init__(self) -> None:
        for name in ("teacher", "out"):
            if not getattr(self, name):
                raise ValueError(f"save-logits: {name} is required")
        for name in ("epochs", "topk", "batch_size", "chunk_size", "val_per_class"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"save-logits: {name}={getattr(self, name)!r}; expected an integer >= 1")


def teacher_records(teacher: Teacher, x: torch.Tensor, seeds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Records of a batch: the teacher's softmax at T = 1, top-K sorted descending, with the seeds."""
    probs = torch.softmax(teacher(x), dim=-1)
    values, indices = probs.topk(dtype["value"].shape[0], dim=-1, sorted=True)
    rec = np.empty(x.shape[0], dtype=dtype)
    rec["seed"] = seeds
    rec["index"] = indices.cpu().numpy()
    rec["value"] = values.cpu().numpy().astype(np.float16)
    return rec


def store_manifest(cfg: SaveLogitsConfig, teacher: Teacher, data, img_size: int, aug) -> dict[str, Any]:
    """What the store records about itself: everything a student must match to use it."""
    c = data.num_classes
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "topk": cfg.topk,
        "num_classes": c,
        "num_samples": len(data.train),
        "index_dtype": "int16" if c <= INT16_MAX_CLASSES else "int32",
        "record_bytes": record_dtype(cfg.topk, c).itemsize,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "img_size": img_size,
        "recipe": cfg.recipe,
        "augment": aug.to_dict(),
        "teacher": {**teacher.describe(), "dtype": teacher.compute_dtype()},
        "data": {"name": data.name, "classes": data.classes, "digest": data.train.digest(), "images": len(data.train)},
        "split": {"val_per_class": cfg.val_per_class, "seed": cfg.seed},
        "chunk_size": cfg.chunk_size,
    }


def _open_store(root: Path, manifest: dict[str, Any], dist: DistInfo) -> None:
    """Write the manifest, or check the one there (a store is only ever continued, never overwritten)."""
    if (root / "manifest.json").is_file():
        store = LogitStore(root)
        store.check({k: v for k, v in manifest.items() if k not in EXTENDABLE}, what="this save-logits run")
        if dist.is_main and store.manifest["epochs"] < manifest["epochs"]:
            write_manifest(root, manifest)
    elif dist.is_main:
        write_manifest(root, manifest)
    barrier(dist)


def _save_chunk(
    ctx: dict[str, Any], epoch: int, lo: int, hi: int, seeds: np.ndarray, partners: np.ndarray | None
) -> None:
    cfg, data, aug, teacher, dtype, device = (ctx[k] for k in ("cfg", "data", "aug", "teacher", "dtype", "device"))
    idx = np.arange(lo, hi)
    batches = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    parts = []
    for index, (images, labels) in zip(batches, data.train.batches(batches), strict=True):
        p = partners[index] if partners is not None else None
        x, _ = replay_from_split(
            aug, data.train, index, images.to(device), labels, seeds[index], p, seeds[p] if p is not None else None
        )
        parts.append(teacher_records(teacher, x, seeds[index], dtype))
    write_chunk(chunk_file(ctx["root"], epoch, lo // cfg.chunk_size), np.concatenate(parts))


def _teacher_and_data(cfg: SaveLogitsConfig, data: ImageData | None) -> tuple[Teacher, ImageData, int]:
    """A teacher from a file brings its input size (the data is loaded at it); a registered model is
    built for the data's classes at img_size (default: the data's own size)."""
    load = dict(weights=cfg.teacher_weights, dtype=cfg.teacher_dtype)
    teacher = load_teacher(cfg.teacher, **load) if Path(cfg.teacher).exists() else None
    img_size = cfg.img_size or (teacher.input_size[1] if teacher else None)
    if data is None:
        data = load_data(cfg.data_path, img_size=img_size, val_per_class=cfg.val_per_class, seed=cfg.seed)
    img_size = img_size or data.image_size
    if teacher is None:
        teacher = load_teacher(cfg.teacher, num_classes=data.num_classes, img_size=img_size, **load)
    teacher.check_fits(num_classes=data.num_classes, img_size=img_size, student="the data")
    return teacher, data, img_size


def save_logits(
    cfg: SaveLogitsConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    data: ImageData | None = None,
) -> dict[str, Any]:
    """Make (or continue) the store at `cfg.out`; returns its manifest and what this call wrote. `data`:
    images already loaded (default: load cfg.data_path as training does)."""
    device = torch.device(device)
    with runtime_settings(cfg.threads):
        dist = init_distributed(device)
        if device.type == "cuda" and dist.enabled:
            device = torch.device("cuda", dist.local_rank)
        teacher, data, img_size = _teacher_and_data(cfg, data)
        teacher.to(device)
        aug_cfg = recipe_of(cfg.recipe).override(**cfg.augment)
        if aug_cfg.repeats > 1:
            raise ValueError(
                f"recipe {cfg.recipe!r} repeats each image {aug_cfg.repeats}x per epoch; a store holds one record "
                f"per image and epoch: pass --augment repeats=1 (and train the student with it)"
            )
        if cfg.topk < 1 or cfg.topk > data.num_classes:
            raise ValueError(f"topk={cfg.topk}; expected 1..{data.num_classes} (the number of classes)")
        root = Path(cfg.out)
        manifest = store_manifest(cfg, teacher, data, img_size, aug_cfg)
        _open_store(root, manifest, dist)
        aug = ReplayAugment(aug_cfg, img_size, data.num_classes)
        n, dtype = len(data.train), record_dtype(cfg.topk, data.num_classes)
        ctx = dict(cfg=cfg, data=data, aug=aug, teacher=teacher, dtype=dtype, device=device, root=root)
        chunks = -(-n // cfg.chunk_size)
        total, done, written = cfg.epochs * chunks, 0, 0
        for epoch in range(cfg.epochs):
            if epoch_file(root, epoch).is_file():
                done += chunks
                continue
            seeds = sample_seeds(cfg.seed, epoch, n)
            partners = mix_partners(cfg.seed, epoch, n) if aug.mixes else None
            for c in range(chunks):
                if c % dist.world == dist.rank and not chunk_file(root, epoch, c).is_file():
                    _save_chunk(ctx, epoch, c * cfg.chunk_size, min(n, (c + 1) * cfg.chunk_size), seeds, partners)
                    written += 1
                done += 1
                if progress:
                    progress(done, total)
            barrier(dist)
            if dist.is_main:
                assemble_epoch(root, epoch, chunks, dtype, n)
                log.info("epoch %d of %d stored in %s", epoch + 1, cfg.epochs, epoch_file(root, epoch))
            barrier(dist)
    return {"manifest": manifest, "chunks_written": written, "store": str(root)}
