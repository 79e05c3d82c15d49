"""Search spaces and architecture configs (pure Python: no torch import).

Two kinds share one protocol (sample / mutate / crossover / contains / smallest / largest / size /
arch_from_dict): `SearchSpace` of ViTs (`ArchConfig`) and `MBConvSpace` of Cream's MobileNet-style
networks (`MBConvArch`). `load_space`, `space_from_dict` and `arch_from_yaml` pick the kind."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitnas.space.arch import ArchConfig
from vitnas.space.mbconv import MBConvArch, MBConvSpace
from vitnas.space.space import SearchSpace
from vitnas.space.yaml_io import load_yaml

__all__ = ["ArchConfig", "MBConvArch", "MBConvSpace", "SearchSpace", "arch_from_yaml", "load_space", "space_from_dict"]

AnySpace = SearchSpace | MBConvSpace


def _is_mbconv(data: Any) -> bool:
    return isinstance(data, Mapping) and "channels" in data  # MBConv spaces list stage widths; ViT spaces do not


def load_space(name_or_path: str) -> AnySpace:
    """A preset name (`vitnas.space.SearchSpace.presets()` + `MBConvSpace.presets()`) or a space YAML of
    either kind."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        data = load_yaml(name_or_path)
        inner = data.get("space", data) if isinstance(data, Mapping) else data
        return MBConvSpace.from_yaml(name_or_path) if _is_mbconv(inner) else SearchSpace.from_yaml(name_or_path)
    if name_or_path in MBConvSpace.presets():
        return MBConvSpace.preset(name_or_path)
    if name_or_path not in SearchSpace.presets():
        raise ValueError(
            f"unknown search space preset {name_or_path!r}; choose one of "
            f"{sorted(SearchSpace.presets() + MBConvSpace.presets())} or give a space YAML"
        )
    return SearchSpace.preset(name_or_path)


def space_from_dict(data: Mapping[str, Any], *, source: str = "space") -> AnySpace:
    """A space from its `to_dict()` form (what checkpoints store), of either kind."""
    if _is_mbconv(data):
        return MBConvSpace.from_dict(data, source=source)
    return SearchSpace(**data)


def arch_from_yaml(space: AnySpace, path: str | Path) -> Any:
    """An arch YAML read as `space`'s kind of arch (and checked to lie in it)."""
    kind = type(space.largest())
    return space.check_arch(kind.from_yaml(path), source=path)
