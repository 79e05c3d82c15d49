"""Cost windows ([min, max] on params, MACs, latency) and the space's feasible range."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["Constraints", "InfeasibleConstraint"]

COSTS = ("params", "macs", "latency_ms")
CostFn = Callable[[ArchConfig], float]


class InfeasibleConstraint(ValueError):
    """No arch of the space can meet a constraint."""


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{source}: constraint {name} bounds must be numbers, got {value!r}")
    try:
        return float(value)  # YAML reads 150e3 as a string
    except (TypeError, ValueError):
        raise ValueError(f"{source}: constraint {name} bounds must be numbers, got {value!r}") from None


def _window(value: Any, name: str, source: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)):
        return (0.0, _number(value, name, source))  # a single number is an upper bound
    if len(value) != 2:
        raise ValueError(f"{source}: constraint {name} must be [min, max] (null for an open end), got {value!r}")
    lo = 0.0 if value[0] is None else _number(value[0], name, source)
    hi = float("inf") if value[1] is None else _number(value[1], name, source)
    if lo > hi:
        raise ValueError(f"{source}: constraint {name}: min {lo:g} is above max {hi:g}")
    return lo, hi


@dataclass(frozen=True)
class Constraints:
    """[min, max] windows keyed by cost name (params, macs, latency_ms)."""

    windows: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "constraints") -> Constraints:
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"{source}: constraints must be a mapping like {{params: [null, 5.0e6]}}, got {data!r}")
        windows = {}
        for name, value in (data or {}).items():
            if name not in COSTS:
                raise ValueError(f"{source}: unknown constraint {name!r}; expected one of {list(COSTS)}")
            if value is not None:
                windows[name] = _window(value, name, source)
        return cls(windows)

    def to_dict(self) -> dict[str, list[float | None]]:
        return {k: [lo, None if hi == float("inf") else hi] for k, (lo, hi) in self.windows.items()}

    def satisfied(self, costs: Mapping[str, float]) -> bool:
        return all(lo <= costs[name] <= hi for name, (lo, hi) in self.windows.items())

    def check_feasible(self, space: SearchSpace, cost_fns: Mapping[str, CostFn]) -> dict[str, tuple[float, float]]:
        """Fail at once when a window misses the space's range. Every cost grows with every dimension,
        so the smallest and largest archs bound it. Returns the ranges."""
        ranges = {}
        for name, (lo, hi) in self.windows.items():
            if name not in cost_fns:
                raise ValueError(f"constraint on {name} but no {name} model was given")
            a, b = cost_fns[name](space.smallest()), cost_fns[name](space.largest())
            ranges[name] = (min(a, b), max(a, b))
            if hi < ranges[name][0] or lo > ranges[name][1]:
                raise InfeasibleConstraint(
                    f"no arch in space {space.name!r} can meet {name} in [{lo:g}, {hi:g}]: the space's archs "
                    f"range over [{ranges[name][0]:g}, {ranges[name][1]:g}]"
                )
        return ranges
