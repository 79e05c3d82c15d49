"""Searching the search space (S3 / AutoFormerV2, NeurIPS'21): measure a space by its E-T error, then move
each dimension's range toward the values whose error trend is lower, retrain, repeat.

A space here is the current range (a window of consecutive values on a grid) of every searched dimension.
Its quality is measured with weights inherited from a supernet trained on it:

- E: the mean error of `samples` architectures drawn uniformly from the space (its expected error);
- T: the mean error of its `top_k` best among them (its top tier);
- E-T error = (E + T) / 2.

The paper's update constants were not available to us (its search code was never released, Cream#128,
and the method text could not be read here), so the rule below is ours, stated so it can be checked: the
error of every sampled architecture is regressed on all dimensions at once (least squares on values
measured in grid steps of each dimension); a dimension whose slope is significant (|t| >= `min_t`) moves
its window one grid step in the direction that lowers the error, others stay. A window never leaves its
grid. `shift_ranges` is the whole rule and is tested on synthetic errors with a known optimum.

Spaces take part through three methods: `ranges()` (dimension name -> tuple of choices), `with_ranges(r)`
(the same space with other choices) and `arch_values(arch)` (dimension name -> the arch's value, e.g. the
mean MLP ratio of a stage's blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Shift", "et_error", "grid_around", "shift_ranges"]

log = logging.getLogger(__name__)


def et_error(errors: Sequence[float], top_k: int) -> dict[str, float]:
    """{'E', 'T', 'ET'} of a space from its sampled architectures' errors (%, lower is better)."""
    if not len(errors):
        raise ValueError("E-T error of a space needs at least one sampled architecture")
    e = np.sort(np.asarray(errors, dtype=float))
    k = max(1, min(top_k, len(e)))
    mean, top = float(e.mean()), float(e[:k].mean())
    return {"E": mean, "T": top, "ET": (mean + top) / 2}


def grid_around(choices: Sequence[float], extend: int, *, integer: bool) -> tuple[float, ...]:
    """A grid for a dimension whose current choices are `choices`: their spacing (the smallest step
    between neighbours; 1 for a single choice of an integer dimension, its value for a single real one)
    continued `extend` steps beyond both ends, kept positive."""
    c = sorted(set(choices))
    step = min(np.diff(c)) if len(c) > 1 else (1 if integer else c[0] / 2)
    lo = [c[0] - step * i for i in range(extend, 0, -1)]
    hi = [c[-1] + step * i for i in range(1, extend + 1)]
    values = [v for v in lo if v > 0] + c + hi
    # values between the choices at the same spacing, so the window can slide by one step
    full = np.arange(values[0], values[-1] + step / 2, step)
    return tuple(int(round(v)) if integer else round(float(v), 6) for v in full)


@dataclass(frozen=True)
class Shift:
    """What the rule did to one dimension: its slope (error points per grid step), t statistic, and the
    window before and after."""

    name: str
    slope: float
    t: float
    before: tuple[float, ...]
    after: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"slope": self.slope, "t": self.t, "before": list(self.before), "after": list(self.after)}


def _slopes(values: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slopes of errors on the columns of `values` (with an intercept) and their t statistics;
    columns without variation get slope 0 and t 0."""
    n, d = values.shape
    varying = values.std(axis=0) > 1e-12
    x = np.column_stack([np.ones(n), values[:, varying]])
    coef, *_ = np.linalg.lstsq(x, errors, rcond=None)
    dof = max(n - x.shape[1], 1)
    resid = errors - x @ coef
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    se = np.sqrt(np.maximum(np.diag(cov), 1e-300))
    slopes, ts = np.zeros(d), np.zeros(d)
    slopes[varying], ts[varying] = coef[1:], coef[1:] / se[1:]
    return slopes, ts


def shift_ranges(
    ranges: Mapping[str, Sequence[float]],
    grids: Mapping[str, Sequence[float]],
    samples: Sequence[tuple[Mapping[str, float], float]],
    *,
    min_t: float = 2.0,
) -> tuple[dict[str, tuple[float, ...]], list[Shift]]:
    """The next ranges: every dimension whose error slope is significant moves one grid step downhill.

    `samples`: (the arch's value per dimension, its error) pairs. Values are measured in grid steps of
    their dimension, so slopes compare across dimensions."""
    names = list(ranges)
    for name in names:
        missing = [v for v in ranges[name] if v not in grids[name]]
        if missing:
            raise ValueError(f"dimension {name}: choices {missing} are not on its grid {list(grids[name])}")
    steps = {n: (np.diff(grids[n]).mean() if len(grids[n]) > 1 else 1.0) for n in names}
    values = np.array([[s[0][n] / steps[n] for n in names] for s in samples], dtype=float)
    errors = np.array([s[1] for s in samples], dtype=float)
    if len(samples) < len(names) + 2:
        raise ValueError(f"{len(samples)} samples cannot fit slopes of {len(names)} dimensions; sample more")
    slopes, ts = _slopes(values, errors)
    out, shifts = {}, []
    for i, name in enumerate(names):
        grid, window = list(grids[name]), list(ranges[name])
        lo, hi = grid.index(window[0]), grid.index(window[-1])
        move = 0
        if abs(ts[i]) >= min_t:
            move = 1 if slopes[i] < 0 else -1  # error falls as the value grows: move up
        if lo + move < 0 or hi + move >= len(grid):
            move = 0
        new = tuple(grid[lo + move : hi + move + 1])
        out[name] = new
        shifts.append(Shift(name, float(slopes[i]), float(ts[i]), tuple(window), new))
    return out, shifts
