"""Counted MACs of any registered model, and the input size a model is built for."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitnas.models.registry import create_model

__all__ = ["count_macs", "model_input_size", "model_macs"]


def count_macs(name: str, **overrides: Any) -> int:
    """MACs of one image of a registered model at its input size (see `model_macs`)."""
    with torch.device("meta"):
        return model_macs(create_model(name, **overrides))


def model_macs(model: nn.Module) -> int:
    """MACs of one image at the model's input size: FlopCounterMode over a forward of a model built on the
    meta device, so nothing is computed and fused CPU attention kernels (which the counter does not see)
    are not chosen."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *model_input_size(model), device="meta"))
    return counter.get_total_flops() // 2


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) a model is built for: its `config` (img_size, in_chans) or `img_size`."""
    cfg = getattr(model, "config", None) or {}
    img = cfg.get("img_size", getattr(model, "img_size", None))
    if img is None:
        raise ValueError(f"{type(model).__name__} does not say its input size (no config['img_size'] or img_size)")
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    return int(cfg.get("in_chans", 3)), int(h), int(w)
