"""Type checks for config dataclasses read from YAML or flags.

YAML 1.1 reads `5e-4` (no dot) as a string; numeric fields accept such strings and convert them, and
any other type mismatch is an error naming the key and the value.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _convert(value: Any, kind: str, name: str, source: str) -> Any:
    def bad() -> ValueError:
        return ValueError(f"{source}: {name} must be {kind}, got {value!r}")

    if kind == "float":
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if kind == "int":
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad() from None
            if f.is_integer():
                return int(f)
        raise bad()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise bad()
    if kind == "str":
        if isinstance(value, str):
            return value
        raise bad()
    if kind.startswith("dict"):
        if isinstance(value, dict):
            return value
        raise ValueError(f"{source}: {name} must be a mapping, got {value!r}")
    return value


def from_known_keys(cls: type, data: dict[str, Any] | None, source: str) -> Any:
    """`cls(**data)` for a config dataclass, after refusing any key that is not one of its fields (a typo in a
    YAML section or a KEY=VALUE flag is an error naming the section, not silently ignored)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data or {}:
        if key not in names:
            raise ValueError(f"{source}: unknown key {key!r}; expected one of {names}")
    return cls(**(data or {}))


def check_fields(obj: Any, source: str) -> None:
    """Convert and check every field of a dataclass instance in place."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None:
            if "None" in kinds:
                continue
            raise ValueError(f"{source}: {f.name} must be {kinds[0]}, got null")
        kind = next(k for k in kinds if k != "None")
        setattr(obj, f.name, _convert(value, kind, f.name, source))


def check_range(
    source: str, name: str, value: float, lo: float | None = None, hi: float | None = None, *, strict_lo: bool = False
) -> None:
    if value is None:
        return
    if lo is not None and (value < lo or (strict_lo and value == lo)):
        raise ValueError(f"{source}: {name} must be {'>' if strict_lo else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{source}: {name} must be <= {hi:g}, got {value!r}")


def field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment` in the class source, for --help texts; a field with
    no comment gets its default."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = comments.get(f.name, "")
        out[f.name] = f"{text} (default: {default!r})" if text else f"default: {default!r}"
    return out
