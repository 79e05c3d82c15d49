"""Tables and plots from search artefacts (matplotlib, written as PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitnas._io import atomic_path

__all__ = ["plot_candidates", "plot_progress", "table"]

UNITS = {"params": "parameters", "macs": "MACs", "latency_ms": "latency"}


def _scale(cost: str, values: Sequence[float]) -> tuple[float, str]:
    if cost == "latency_ms":
        return 1.0, "latency (ms)"
    top = max(values, default=0.0)
    for factor, unit in ((1e-9, "G"), (1e-6, "M"), (1e-3, "k")):
        if top * factor >= 1:
            return factor, f"{UNITS[cost]} ({unit})"
    return 1.0, UNITS[cost]


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write the figure as PNG atomically (a plot is never left half-written) and free it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_candidates(
    rows: Sequence[Mapping[str, Any]],
    fronts: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    costs: Sequence[str] = ("params", "macs"),
    title: str = "",
) -> Path:
    """Validation top-1 against each cost, every candidate a dot, the Pareto front a line."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4.2), squeeze=False)
    best = max(rows, key=lambda r: r["top1"]) if rows else None
    for ax, cost in zip(axes[0], costs, strict=False):
        s, label = _scale(cost, [r[cost] for r in rows])
        gens = [r.get("generation", 0) for r in rows]
        sc = ax.scatter(
            [r[cost] * s for r in rows],
            [r["top1"] for r in rows],
            c=gens,
            cmap="viridis",
            s=14,
            alpha=0.7,
            label="candidates",
        )
        front = sorted(fronts.get(cost, []), key=lambda r: r[cost])
        if front:
            ax.plot(
                [r[cost] * s for r in front],
                [r["top1"] for r in front],
                "-o",
                color="crimson",
                ms=5,
                label="Pareto front",
            )
        if best is not None:
            ax.scatter(
                [best[cost] * s], [best["top1"]], marker="*", s=220, color="gold", edgecolor="k", zorder=5, label="best"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(sc, ax=axes[0].tolist(), label="generation", shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_progress(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """Best validation top-1 so far per generation, one line per strategy (e.g. evolution vs random)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, "-o", ms=3, label=name)
    ax.set_xlabel("generation")
    ax.set_ylabel("best validation top-1 so far (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in cells)])
