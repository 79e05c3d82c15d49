"""Weight-sharing supernets; all follow one protocol (`set_active`, `active()`, `extract`, `num_params`,
`num_macs`, `space`), so training, search, costs and export never ask which kind they hold."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitnas.space.darts import DartsSpace
from vitnas.space.mbconv import MBConvSpace
from vitnas.space.s3 import S3Space
from vitnas.space.space import SearchSpace
from vitnas.supernet.darts import CDARTSSupernet, DartsSupernet
from vitnas.supernet.mbconv import MBConvSupernet
from vitnas.supernet.s3 import S3Supernet
from vitnas.supernet.vit import ViTSupernet

__all__ = ["CDARTSSupernet", "DartsSupernet", "MBConvSupernet", "S3Supernet", "ViTSupernet", "build_supernet"]


def build_supernet(
    space: SearchSpace | MBConvSpace | S3Space | DartsSpace,
    *,
    img_size: int,
    num_classes: int,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """The supernet of `space`'s kind: a `ViTSupernet` (AutoFormer / ViTAS), an `MBConvSupernet` (Cream) or an
    `S3Supernet` (S3 / AutoFormerV2) or a `DartsSupernet` (DARTS cells; `role="search"` for the α network)."""
    kinds = ((MBConvSpace, MBConvSupernet), (S3Space, S3Supernet), (DartsSpace, DartsSupernet))
    cls = next((net for kind, net in kinds if isinstance(space, kind)), ViTSupernet)
    return cls(space, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
