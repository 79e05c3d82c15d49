"""Model registry, timm-style: each variant is a registered function holding only its arguments, defined at
the foot of its model's file. Importing `vitnas.models` imports every model module, which fills the
registry; this module imports no model.

model = vitnas.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", num_classes=10)
vitnas.list_models("deit_small*")
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword arguments override its defaults (num_classes, img_size, ...)."""
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {name!r}; similar: {close or list_models()[:8]}")
    model = _REGISTRY[name](**overrides)
    # How to rebuild it (checkpoints, exported folders): the registered name and the overrides.
    model.registry_spec = {"name": name, "kwargs": dict(overrides)}
    return model
