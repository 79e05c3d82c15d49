"""Search spaces and architecture configs (pure Python: no torch import).

Four kinds share one protocol (sample / mutate / crossover / contains / smallest / largest / size /
arch_from_dict): `SearchSpace` of ViTs (`ArchConfig`), `MBConvSpace` of Cream's MobileNet-style
networks (`MBConvArch`), `S3Space` of S3's hierarchical window transformers (`S3Arch`) and `DartsSpace` of
DARTS cells (`Genotype`). `load_space`,
`space_from_dict` and `arch_from_yaml` pick the kind."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitnas.space.arch import ArchConfig
from vitnas.space.darts import DartsSpace, Genotype
from vitnas.space.mbconv import MBConvArch, MBConvSpace
from vitnas.space.s3 import S3Arch, S3Space
from vitnas.space.space import SearchSpace
from vitnas.space.yaml_io import load_yaml

__all__ = [
    "ArchConfig",
    "DartsSpace",
    "Genotype",
    "MBConvArch",
    "MBConvSpace",
    "S3Arch",
    "S3Space",
    "SearchSpace",
    "arch_from_yaml",
    "load_space",
    "space_from_dict",
]

AnySpace = SearchSpace | MBConvSpace | S3Space | DartsSpace


def _is_mbconv(data: Any) -> bool:
    return isinstance(data, Mapping) and "channels" in data  # MBConv spaces list stage widths; ViT spaces do not


def _is_s3(data: Any) -> bool:
    return isinstance(data, Mapping) and "window_sizes" in data  # only S3 spaces search windows


def _is_darts(data: Any) -> bool:
    return isinstance(data, Mapping) and "search_layers" in data  # only DARTS spaces size a search network


def _kind(data: Any) -> type:
    if _is_darts(data):
        return DartsSpace
    return S3Space if _is_s3(data) else MBConvSpace if _is_mbconv(data) else SearchSpace


def load_space(name_or_path: str) -> AnySpace:
    """A preset name (`vitnas.space.SearchSpace.presets()` + `MBConvSpace.presets()` + `S3Space.presets()`)
    or a space YAML of any kind."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        data = load_yaml(name_or_path)
        inner = data.get("space", data) if isinstance(data, Mapping) else data
        return _kind(inner).from_yaml(name_or_path)
    for kind in (MBConvSpace, S3Space, DartsSpace):
        if name_or_path in kind.presets():
            return kind.preset(name_or_path)
    if name_or_path not in SearchSpace.presets():
        every = SearchSpace.presets() + MBConvSpace.presets() + S3Space.presets() + DartsSpace.presets()
        raise ValueError(
            f"unknown search space preset {name_or_path!r}; choose one of {sorted(every)} or give a space YAML"
        )
    return SearchSpace.preset(name_or_path)


def space_from_dict(data: Mapping[str, Any], *, source: str = "space") -> AnySpace:
    """A space from its `to_dict()` form (what checkpoints store), of any kind."""
    kind = _kind(data)
    return SearchSpace(**data) if kind is SearchSpace else kind.from_dict(data, source=source)


def arch_from_yaml(space: AnySpace, path: str | Path) -> Any:
    """An arch YAML read as `space`'s kind of arch (and checked to lie in it)."""
    kind = type(space.largest())
    return space.check_arch(kind.from_yaml(path), source=path)
