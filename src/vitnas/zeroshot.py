"""Zero-shot classification with a CLIP model: class prompts become a linear classifier of text features, which
scores images with no training on their labels (how CLIP and TinyCLIP report ImageNet top-1).

The model is duck-typed: `encode_image(images) -> (B, D)` and `encode_text(tokens) -> (N, D)`, both unnormalized;
`tokenize(list[str]) -> LongTensor (N, L)` is passed in, so any tokenizer fits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.data.augment import AugmentConfig, eval_transform
from vitnas.data.datasets import Split
from vitnas.data.image_text import CIFAR10_TEMPLATES, DIGIT_TEMPLATES, IMAGENET_TEMPLATES, Template, fill_template
from vitnas.precision import autocast

__all__ = [
    "CIFAR10_TEMPLATES",
    "DIGIT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "evaluate_zeroshot",
    "zeroshot_classifier",
    "zeroshot_logits",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[Template],
    tokenize: Callable[[list[str]], Tensor],
    device: torch.device | str = "cpu",
    *,
    classes_per_batch: int = 10,
) -> Tensor:
    """(D, C) classifier weights: each class's prompts (every template filled with its name) are encoded,
    L2-normalized, averaged over the templates and normalized again (open_clip's build_zero_shot_classifier,
    TinyCLIP's zero_shot_classifier), so a prompt ensemble counts each wording equally."""
    if not classnames or not templates:
        raise ValueError(
            f"a zero-shot classifier needs class names and templates (got {len(classnames)} names, "
            f"{len(templates)} templates)"
        )
    columns = []
    with _eval_mode(model):
        for i in range(0, len(classnames), classes_per_batch):
            names = classnames[i : i + classes_per_batch]
            texts = [fill_template(t, name) for name in names for t in templates]
            features = F.normalize(model.encode_text(tokenize(texts).to(device)).float(), dim=-1)
            per_class = features.view(len(names), len(templates), -1).mean(dim=1)
            columns.append(F.normalize(per_class, dim=-1).T)
    return torch.cat(columns, dim=1)


def zeroshot_logits(model: nn.Module, images: Tensor, classifier: Tensor) -> Tensor:
    """(B, C) cosine similarities of normalized images to the class columns of `classifier` (the logit scale
    leaves the ranking, hence top-k, unchanged)."""
    features = F.normalize(model.encode_image(images).float(), dim=-1)
    return features @ classifier.to(features.device, features.dtype)


def _normalized(
    data: Split | Iterable[tuple[Tensor, Tensor]],
    norm: AugmentConfig,
    img_size: int | None,
    batch_size: int,
    device: torch.device | str,
    rank: int,
    world: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    batches = data.sequential(batch_size, rank, world) if isinstance(data, Split) else data
    for images, labels in batches:
        size = img_size or int(images.shape[-1])
        yield eval_transform(images.to(device), size, norm), labels.to(device)


@torch.inference_mode()
def evaluate_zeroshot(
    model: nn.Module,
    data: Split | Iterable[tuple[Tensor, Tensor]],
    classifier: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """{'top1': %, 'top5': %, 'n': images} of zero-shot classification of `data` (a Split, sharded across ranks,
    or any iterable of uint8 (images, labels) batches). Images are scaled to [0, 1] and normalized with the
    model's `mean` / `std` (CLIP's, not ImageNet's, for CLIP weights), center-cropped or resized to `img_size`.
    Top-5 is top-min(5, C). `reduce` (an all-reduce sum) combines the counts of ranks."""
    norm = AugmentConfig(mean=tuple(mean), std=tuple(std))
    k = min(5, classifier.shape[1])
    totals = torch.zeros(3, dtype=torch.float64)
    with _eval_mode(model):
        for x, labels in _normalized(data, norm, img_size, batch_size, device, rank, world):
            with autocast(x.device, amp_dtype):
                logits = zeroshot_logits(model, x, classifier)
            top = logits.float().topk(k, dim=-1).indices
            hit = top == labels[:, None]
            totals[0] += hit[:, 0].sum().item()
            totals[1] += hit.any(dim=-1).sum().item()
            totals[2] += labels.numel()
    if reduce is not None:
        totals = reduce(totals)
    n = totals[2].item()
    if n == 0:
        raise ValueError("cannot evaluate zero-shot classification on no images")
    out = {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n, "n": int(n)}
    log.info("zero-shot top-1 %.2f%%, top-%d %.2f%% on %d images", out["top1"], k, out["top5"], out["n"])
    return out
