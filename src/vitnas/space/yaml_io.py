"""Generic YAML reading and writing, plus key checks for AutoFormer's config files.

The bottom layer of `vitnas.space`: it knows no space type. `ArchConfig` and `SearchSpace` parse their
own mappings (ours and AutoFormer's) with these helpers.

AutoFormer configs have upper-case sections: `SUPERNET` (capacity), `SEARCH_SPACE` (choices) and
`RETRAIN` (one subnet), each with `EMBED_DIM`, `DEPTH`, `MLP_RATIO`, `NUM_HEADS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vitnas._io import atomic_write_text

__all__ = ["dump_yaml", "load_yaml", "check_keys", "is_autoformer", "check_autoformer"]

AUTOFORMER_SECTIONS = ("SUPERNET", "SEARCH_SPACE", "RETRAIN")
AUTOFORMER_KEYS = ("EMBED_DIM", "DEPTH", "MLP_RATIO", "NUM_HEADS")


def dump_yaml(data: dict[str, Any], path: str | Path | None = None) -> str:
    """Return the YAML text; also write it (atomically) when `path` is given."""
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


def check_keys(section: Any, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> Mapping:
    """`section` itself, or ValueError naming `where`, the offending key and the keys expected."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {list(allowed)}, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; expected one of {list(allowed)}")
    for key in required:
        if key not in section:
            raise ValueError(f"{where}: missing key {key!r}")
    return section


def is_autoformer(data: Any) -> bool:
    """Whether a loaded YAML document is an AutoFormer config (it has an upper-case section)."""
    return isinstance(data, Mapping) and any(k in data for k in AUTOFORMER_SECTIONS)


def check_autoformer(data: Mapping, path: str | Path, section: str, why: str) -> Mapping:
    """Check every section's keys, then return `section`, which must be present (`why` says what for)."""
    check_keys(data, AUTOFORMER_SECTIONS, str(path))
    for name, body in data.items():
        check_keys(body, AUTOFORMER_KEYS, f"{path}: {name}", required=AUTOFORMER_KEYS)
    if section not in data:
        raise ValueError(f"{path}: missing key {section!r} ({why})")
    return data[section]
