"""vitnas: design efficient vision transformers by search and distillation.

`vitnas.space` is importable without torch; the torch-backed names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitnas.space import ArchConfig, MBConvArch, MBConvSpace, S3Arch, S3Space, SearchSpace, load_space

__version__ = "0.1.0"

_LAZY = {
    "ViTSupernet": "vitnas.supernet",
    "MBConvSupernet": "vitnas.supernet",
    "S3Supernet": "vitnas.supernet",
    "build_supernet": "vitnas.supernet",
    "VisionTransformer": "vitnas.models",
    "create_model": "vitnas.models",
    "list_models": "vitnas.models",
    "load_weights": "vitnas.models",
    "load_autoformer": "vitnas.compat.autoformer",
    "ViTCostModel": "vitnas.costs",
}

__all__ = [
    "ArchConfig",
    "MBConvArch",
    "MBConvSpace",
    "S3Arch",
    "S3Space",
    "SearchSpace",
    "__version__",
    "load_space",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitnas' has no attribute {name!r}")
