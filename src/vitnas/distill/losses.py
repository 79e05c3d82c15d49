"""Logit distillation losses (Hinton et al. 2015; DeiT, Touvron et al. 2021).

soft: (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
      the KL averaged over the batch (DeiT's code divides its summed KL by batch x classes instead,
      which only rescales alpha).
hard: (1 - alpha) * CE(student, targets) + alpha * CE(student, argmax teacher): DeiT's hard
      distillation, here on the one classification head (no distillation token).
`targets` are the (possibly mixed / smoothed) soft labels of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KD_KINDS", "hard_kd_loss", "kd_loss", "soft_cross_entropy", "soft_kd_loss"]

KD_KINDS = ("soft", "hard")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets (mixup / cutmix / label smoothing / a teacher)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # reduced precision in, fp32 loss out
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def soft_kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    log_p_s = F.log_softmax(student.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * tau * tau


def hard_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1))


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, kind: str, alpha: float, tau: float
) -> torch.Tensor:
    """The label loss and the distillation loss, mixed by `alpha` (0: labels only, 1: teacher only)."""
    if kind not in KD_KINDS:
        raise ValueError(f"distill={kind!r}; expected one of {KD_KINDS}")
    distill = soft_kd_loss(student, teacher, tau) if kind == "soft" else hard_kd_loss(student, teacher)
    return (1 - alpha) * soft_cross_entropy(student, targets) + alpha * distill
