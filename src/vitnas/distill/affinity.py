"""TinyCLIP's affinity mimicking and CLIP's contrastive (InfoNCE) loss, on features gathered across DDP ranks.

Affinity mimicking (TinyCLIP, `src/open_clip/clip_soft_loss.py`): the student's image-to-text and text-to-image
affinities (scaled cosine similarities of each local sample to every sample of the global batch) are trained
towards the teacher's, softmaxed, with soft cross-entropy in both directions. The student learns how the teacher
relates images and texts across the batch, not just which pair matches.

Features are passed in L2-normalized; `scale` is the multiplier (the exp of a model's log-scale). The teacher's
features come from a forward pass under `torch.no_grad()` by the caller. Each rank computes the loss of its own
rows against the global batch (open_clip's `local_loss`); with `gather_with_grad` (TinyCLIP's scripts pass
`--gather-with-grad --local-loss`) the gradients, averaged by DDP, equal those of the loss of the whole global
batch on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["affinity_loss", "affinity_losses", "clip_loss", "gather_feature", "gather_features", "tinyclip_loss"]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_with_grad(x: Tensor) -> Tensor:
    """A differentiable all-gather along dim 0: torch's functional collective where it has one (the
    `torch.distributed.nn` version is deprecated), else that one."""
    from torch.distributed import _functional_collectives as fcol

    if hasattr(fcol, "all_gather_tensor_autograd"):
        return fcol.all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_feature(x: Tensor, *, gather_with_grad: bool = False) -> Tensor:
    """`x` of every rank, concatenated in rank order (identity in one process). With `gather_with_grad` the
    gather is differentiable (each rank's input receives the gradients all ranks send it); without, the other
    ranks' rows are constants and this rank's own rows are put back so their gradient still flows."""
    rank, world = _rank_world()
    if world == 1:
        return x
    if gather_with_grad:
        return _all_gather_with_grad(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_features(
    image_f: Tensor, text_f: Tensor, *, local_loss: bool = True, gather_with_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """(all image features, all text features) of the global batch, as open_clip's ClipLoss gathers them.

    Unlike open_clip, this rank's rows are put back with their gradient also when `local_loss` is set (open_clip
    does so only for the global loss); `local_loss` is kept for the signature and changes nothing here."""
    del local_loss  # the gather is the same; the caller decides which rows its loss uses
    return gather_feature(image_f, gather_with_grad=gather_with_grad), gather_feature(
        text_f, gather_with_grad=gather_with_grad
    )


def _local_logits(
    image_f: Tensor, text_f: Tensor, scale: Tensor | float, gather_with_grad: bool
) -> tuple[Tensor, Tensor]:
    """(s·I_loc·T_allᵀ, s·T_loc·I_allᵀ) in float32: each local row against the global batch."""
    image_f, text_f = image_f.float(), text_f.float()
    all_image, all_text = gather_features(image_f, text_f, gather_with_grad=gather_with_grad)
    return scale * image_f @ all_text.T, scale * text_f @ all_image.T


def clip_loss(image_f: Tensor, text_f: Tensor, scale: Tensor | float, *, gather_with_grad: bool = True) -> Tensor:
    """CLIP's symmetric InfoNCE, 0.5·(CE(image→text) + CE(text→image)), over the global batch. The matching
    text of local image i is global column rank·B + i (open_clip's local-loss labels)."""
    rank, _ = _rank_world()
    logits_i2t, logits_t2i = _local_logits(image_f, text_f, scale, gather_with_grad)
    labels = torch.arange(image_f.shape[0], device=image_f.device) + rank * image_f.shape[0]
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def affinity_losses(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    gather_with_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """(L_I2T, L_T2I): soft cross-entropy of the student's affinities against the softmax of the teacher's,
    image-to-text and text-to-image, each with its own model's scale (TinyCLIP's ClipSoftLoss)."""
    s_i2t, s_t2i = _local_logits(s_img, s_txt, s_scale, gather_with_grad)
    with torch.no_grad():
        t_i2t, t_t2i = _local_logits(t_img.detach(), t_txt.detach(), t_scale, False)
    return (
        F.cross_entropy(s_i2t, F.softmax(t_i2t, dim=-1)),
        F.cross_entropy(s_t2i, F.softmax(t_t2i, dim=-1)),
    )


def affinity_loss(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    gather_with_grad: bool = True,
) -> Tensor:
    """TinyCLIP's affinity-mimicking loss, 0.5·(L_I2T + L_T2I). At its minimum (student = teacher) it equals
    the entropy of the teacher's affinity softmax, not zero."""
    i2t, t2i = affinity_losses(s_img, s_txt, s_scale, t_img, t_txt, t_scale, gather_with_grad=gather_with_grad)
    return 0.5 * (i2t + t2i)


def tinyclip_loss(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    alpha: float = 1.0,
    weight: float = 1.0,
    gather_with_grad: bool = True,
) -> Tensor:
    """TinyCLIP's distillation loss (`train.py: loss_fn`): 0.5·α·w·(L_I2T + L_T2I) + (1−α)·w·InfoNCE. The
    defaults α = w = 1 are pure affinity mimicking, as in all of TinyCLIP's scripts; each term is computed only
    when its weight is positive."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; expected the share of affinity mimicking in [0, 1]")
    loss = s_img.new_zeros((), dtype=torch.float32)
    if alpha > 0 and weight > 0:
        loss = loss + alpha * weight * affinity_loss(
            s_img, s_txt, s_scale, t_img, t_txt, t_scale, gather_with_grad=gather_with_grad
        )
    if alpha < 1 and weight > 0:
        loss = loss + (1.0 - alpha) * weight * clip_loss(s_img, s_txt, s_scale, gather_with_grad=gather_with_grad)
    return loss
