"""Model registry, timm-style: each variant is a registered function holding only its arguments.

model = vitnas.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", num_classes=10)
vitnas.list_models("deit_small*")
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_input_size", "count_macs"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    _load()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword arguments override its defaults (num_classes, img_size, ...)."""
    _load()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {name!r}; similar: {close or list_models()[:8]}")
    model = _REGISTRY[name](**overrides)
    # How to rebuild it (checkpoints, exported folders): the registered name and the overrides.
    model.registry_spec = {"name": name, "kwargs": dict(overrides)}
    return model


def count_macs(name: str, **overrides: Any) -> int:
    """MACs of one image at the model's input size: FlopCounterMode over a forward on the meta device,
    so nothing is computed and fused CPU attention kernels (which the counter does not see) are not
    chosen."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *model_input_size(model)))
    return counter.get_total_flops() // 2


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) a model is built for: its `config` (img_size, in_chans) or `img_size`."""
    cfg = getattr(model, "config", None) or {}
    img = cfg.get("img_size", getattr(model, "img_size", None))
    if img is None:
        raise ValueError(f"{type(model).__name__} does not say its input size (no config['img_size'] or img_size)")
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    return int(cfg.get("in_chans", 3)), int(h), int(w)


def _load() -> None:
    from vitnas.models import zoo  # noqa: F401  (registers the variants)
