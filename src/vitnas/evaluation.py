"""Top-1 and loss of a model (or one subnet of a supernet) on a data split, in inference mode."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitnas.data.augment import AugmentConfig, eval_transform
from vitnas.data.datasets import Split
from vitnas.precision import autocast
from vitnas.space.arch import ArchConfig

__all__ = ["calibration_batches", "correct_per_image", "evaluate", "recalibrated_batchnorm", "score_batches"]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    img_size: int,
    norm: AugmentConfig,
    arch: ArchConfig | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """{'top1': %, 'loss': mean CE, 'n': images}. With `world` > 1 each rank takes a shard and `reduce`
    (an all-reduce sum) combines the counts. `amp_dtype` runs the model under autocast (None: fp32)."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    with _in_eval_mode(model, arch):
        batches = _normalized(split, img_size, norm, batch_size, device, rank, world)
        return score_batches(model, batches, reduce, amp_dtype)


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module, arch: ArchConfig | None) -> Iterator[None]:
    """The model in eval mode (running `arch` if given) for the body, its train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with model.active(arch) if arch is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def _normalized(
    split: Split, img_size: int, norm: AugmentConfig, batch_size: int, device, rank: int = 0, world: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in split.sequential(batch_size, rank, world):
        yield eval_transform(images.to(device), img_size, norm), labels.to(device)


def _tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def calibration_batches(
    split: Split,
    images: int,
    *,
    img_size: int,
    norm: AugmentConfig,
    batch_size: int = 64,
    device="cpu",
    seed: int = 0,
    model: nn.Module | None = None,
) -> list[torch.Tensor] | None:
    """`images` seeded training images, normalized as for evaluation, in batches: what BatchNorm statistics of
    one path of a weight-sharing supernet are re-estimated on (`recalibrated_batchnorm`). None when `model`
    is given and has no BatchNorm statistics to re-estimate (ViT supernets)."""
    if model is not None and not _tracked_batchnorms(model):
        return None
    n = min(images, len(split))
    idx = np.sort(np.random.default_rng([seed, 4099]).choice(len(split), size=n, replace=False))
    return [x for x, _ in _normalized(split.subset(idx), img_size, norm, batch_size, device)]


@contextlib.contextmanager
def recalibrated_batchnorm(model: nn.Module, batches: list[torch.Tensor] | None) -> Iterator[None]:
    """For the body, the model's BatchNorm statistics re-estimated (cumulative average) on `batches` for the
    path it runs now, the rest of the model in eval mode; every statistic restored after. A supernet's BN
    statistics mix all the paths trained, so a path is scored on its own (as SPOS does). A no-op without
    BatchNorm layers or batches."""
    bns = _tracked_batchnorms(model)
    if not bns or not batches:
        yield
        return
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    was_training = model.training
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in batches:
                model(x)
        model.eval()
        yield
    finally:
        for m, (momentum, mean, var, count) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        model.train(was_training)


@torch.inference_mode()
def score_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """{'top1', 'loss', 'n'} of `model` over normalized (images, labels) batches; `reduce` combines the
    counts across ranks; `amp_dtype` runs the model under autocast (the loss is computed in fp32)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for x, labels in batches:
        with autocast(x.device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").item()
        totals[1] += (logits.argmax(-1) == labels).sum().item()
        totals[2] += labels.numel()
    if reduce is not None:
        totals = reduce(totals)
    n = max(totals[2].item(), 1.0)
    return {"top1": 100.0 * totals[1].item() / n, "loss": totals[0].item() / n, "n": int(totals[2].item())}


@torch.inference_mode()
def correct_per_image(
    model: nn.Module,
    split: Split,
    *,
    img_size: int,
    norm: AugmentConfig,
    arch: ArchConfig | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Whether `model` (or subnet `arch`) classifies each image of `split` correctly: a bool tensor in split
    order, for paired comparisons of two models on the same images."""
    out = []
    with _in_eval_mode(model, arch):
        for x, labels in _normalized(split, img_size, norm, batch_size, device):
            with autocast(x.device, amp_dtype):
                logits = model(x)
            out.append((logits.argmax(-1) == labels).cpu())
    return torch.cat(out)
