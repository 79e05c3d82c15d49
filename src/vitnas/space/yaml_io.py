"""YAML reading and writing for spaces and archs, including AutoFormer's own config files.

AutoFormer configs have upper-case sections: `SUPERNET` (capacity), `SEARCH_SPACE` (choices) and
`RETRAIN` (one subnet), each with `EMBED_DIM`, `DEPTH`, `MLP_RATIO`, `NUM_HEADS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vitnas._io import atomic_write_text
from vitnas.space.arch import ARCH_KEYS, OPTIONAL_KEYS, ArchConfig
from vitnas.space.space import SearchSpace

AUTOFORMER_SECTIONS = ("SUPERNET", "SEARCH_SPACE", "RETRAIN")
AUTOFORMER_KEYS = ("EMBED_DIM", "DEPTH", "MLP_RATIO", "NUM_HEADS")
SPACE_KEYS = tuple(SearchSpace.__dataclass_fields__)


def dump_yaml(data: dict[str, Any], path: str | Path | None = None) -> str:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    if path is not None:
        atomic_write_text(path, text)
    return text


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None


def _check_keys(section: Any, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> Mapping:
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {list(allowed)}, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; expected one of {list(allowed)}")
    for key in required:
        if key not in section:
            raise ValueError(f"{where}: missing key {key!r}")
    return section


def _is_autoformer(data: Any) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in AUTOFORMER_SECTIONS)


def _check_autoformer(data: Mapping, path: Path) -> None:
    _check_keys(data, AUTOFORMER_SECTIONS, str(path))
    for name, section in data.items():
        _check_keys(section, AUTOFORMER_KEYS, f"{path}: {name}", required=AUTOFORMER_KEYS)


def read_space_yaml(path: str | Path) -> SearchSpace:
    path = Path(path)
    data = load_yaml(path)
    if _is_autoformer(data):
        _check_autoformer(data, path)
        if "SEARCH_SPACE" not in data:
            raise ValueError(f"{path}: missing key 'SEARCH_SPACE' (an AutoFormer supernet config needs it)")
        choices = data["SEARCH_SPACE"]
        cap = data.get("SUPERNET", {})
        try:
            return SearchSpace(
                embed_dim=choices["EMBED_DIM"],
                depth=choices["DEPTH"],
                mlp_ratio=choices["MLP_RATIO"],
                num_heads=choices["NUM_HEADS"],
                max_embed_dim=cap.get("EMBED_DIM"),
                max_depth=cap.get("DEPTH"),
                max_mlp_ratio=cap.get("MLP_RATIO"),
                max_num_heads=cap.get("NUM_HEADS"),
                name=path.stem,
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if isinstance(data, Mapping) and "space" in data:
        data = data["space"]
    section = _check_keys(data, SPACE_KEYS, str(path), required=("embed_dim", "depth", "mlp_ratio", "num_heads"))
    kwargs = dict(section)
    kwargs.setdefault("name", path.stem)
    try:
        return SearchSpace(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def read_arch_yaml(path: str | Path) -> ArchConfig:
    path = Path(path)
    data = load_yaml(path)
    if _is_autoformer(data):
        _check_autoformer(data, path)
        if "RETRAIN" not in data:
            raise ValueError(f"{path}: missing key 'RETRAIN' (the subnet of an AutoFormer config)")
        sub = data["RETRAIN"]
        embed = sub["EMBED_DIM"]
        # AutoFormer writes EMBED_DIM either as one number or repeated per layer.
        if isinstance(embed, list):
            if len(set(embed)) != 1:
                raise ValueError(f"{path}: RETRAIN.EMBED_DIM must hold one width, got {embed}")
            embed = embed[0]
        data = {
            "embed_dim": embed,
            "depth": sub["DEPTH"],
            "mlp_ratios": sub["MLP_RATIO"],
            "num_heads": sub["NUM_HEADS"],
        }
    elif isinstance(data, Mapping) and "arch" in data:
        data = data["arch"]
    if isinstance(data, Mapping):
        _check_keys(data, ARCH_KEYS + OPTIONAL_KEYS, str(path))
    return ArchConfig.from_dict(data, source=str(path))
