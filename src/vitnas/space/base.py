"""What every space kind and arch kind share besides their dimensions: presets, plain-dict / JSON / YAML
forms. A kind is a frozen dataclass that mixes these in and names its presets (`_presets`) and its arch type
(`arch_type`); the ViT `SearchSpace` / `ArchConfig` keep their own readers (they also read AutoFormer's)."""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, ClassVar

from vitnas.space.yaml_io import check_keys, dump_yaml, load_yaml

__all__ = ["ArchIO", "SpaceIO", "as_int", "as_number", "as_tuple", "plain_lists"]


def as_int(value: Any, name: str, *, low: int) -> int:
    """An integer >= `low`; numpy integers (what `rng.choice` returns) count as integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def as_number(value: Any, name: str) -> int | float:
    """A positive number, kept an int when it is one (so YAML shows 4, not 4.0, and keys are canonical)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return int(value) if int(value) == value else float(value)


def as_tuple(value: Any, name: str) -> tuple:
    """A list-like value as a tuple (not a string or a mapping)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return tuple(value)


def _read_yaml(path: str | Path, section: str) -> tuple[Path, Any]:
    """A YAML file's content, taken from under a top-level `section:` when it has one."""
    path = Path(path)
    data = load_yaml(path)
    if isinstance(data, Mapping) and section in data:
        data = data[section]
    return path, data


def plain_lists(value: Any) -> Any:
    """Tuples (nested) as lists: the plain-JSON form a kind's constructor reads back."""
    return [plain_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


class ArchIO:
    """JSON and YAML forms of an arch kind with `to_dict` / `from_dict(data, source=...)`."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(json.loads(text), source="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Return the YAML text; also write it (atomically) when `path` is given."""
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        """Read the `to_dict` keys, optionally under a top-level `arch:`."""
        path, data = _read_yaml(path, "arch")
        return cls.from_dict(data, source=str(path))


class SpaceIO:
    """Presets, the dict / YAML forms and membership checks of a space kind (a frozen dataclass whose fields
    are its keys, with `violations(arch)`)."""

    _presets: ClassVar[dict[str, Any]] = {}
    arch_type: ClassVar[type] = object
    kind_name: ClassVar[str] = "space"

    @classmethod
    def preset(cls, name: str) -> Any:
        try:
            return cls._presets[name]
        except KeyError:
            raise ValueError(f"unknown {cls.kind_name} preset {name!r}; choose one of {sorted(cls._presets)}") from None

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(cls._presets)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain_lists(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "space") -> Any:
        check_keys(data, cls.keys(), source)
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Return the YAML text; also write it (atomically) when `path` is given."""
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        """Read the `to_yaml` keys, optionally under a top-level `space:`."""
        path, data = _read_yaml(path, "space")
        data = dict(check_keys(data, cls.keys(), str(path)))
        data.setdefault("name", path.stem)
        return cls.from_dict(data, source=str(path))

    def with_(self, **changes: Any) -> Any:
        return replace(self, **changes)

    def contains(self, arch: Any) -> bool:
        return not self.violations(arch)

    def __contains__(self, arch: object) -> bool:
        return isinstance(arch, self.arch_type) and self.contains(arch)

    def check_arch(self, arch: Any, *, source: str | Path | None = None) -> Any:
        """Return `arch` or raise ValueError naming the first violation (and `source`, the file the arch
        came from)."""
        problems = self.violations(arch)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            where = f"{source}: " if source is not None else ""
            raise ValueError(f"{where}arch outside search space {self.name!r}: {problems[0]}{more}")
        return arch

    def arch_from_dict(self, data: Mapping[str, Any], *, source: str = "arch") -> Any:
        """This space's arch type from its dict (search results, checkpoints)."""
        return self.arch_type.from_dict(data, source=source)
