"""Tables and plots from search artefacts (matplotlib, written as PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitnas._io import atomic_path

__all__ = [
    "plot_candidates",
    "plot_progress",
    "plot_space_search",
    "search_verdict",
    "signal_sentence",
    "summary_text",
    "table",
    "top1_standard_error",
]

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


def top1_standard_error(top1: float, n: int) -> float:
    """Standard error (percentage points) of a top-1 accuracy measured on `n` images: sqrt(p(1-p)/n).
    Two searches whose best scores differ by less than about twice this are not told apart by the data."""
    p = min(max(top1 / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(n, 1))


def plot_progress(
    curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "", val_images: int | None = None
) -> Path:
    """Best validation top-1 so far per generation (numbered from 0, as the log does), one line per
    strategy; with `val_images`, a band of +-1 standard error of each score on that many images, and a
    y-axis at least 5 points tall so that a one-image difference does not look large."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = []
    for name, ys in curves.items():
        xs = list(range(len(ys)))
        (line,) = ax.plot(xs, ys, "-o", ms=3, label=name)
        if val_images:
            se = [top1_standard_error(y, val_images) for y in ys]
            lo, hi = [y - e for y, e in zip(ys, se, strict=True)], [y + e for y, e in zip(ys, se, strict=True)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            values += lo + hi
        values += list(ys)
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        mid, half = (max(finite) + min(finite)) / 2, max((max(finite) - min(finite)) / 2 * 1.1, 2.5)
        ax.set_ylim(mid - half, mid + half)
    ax.set_xlabel("generation")
    label = "best validation top-1 so far (%)"
    ax.set_ylabel(label + (f"\nband: ±1 standard error on {val_images} images" if val_images else ""))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def plot_space_search(iterations: Sequence[Mapping[str, Any]], folder: str | Path) -> list[Path]:
    """A space search's two plots: E, T and E-T error per iteration (`et_error.png`), and each dimension's
    range per iteration (`ranges.png`, one panel per dimension: the window as a band, its choices as dots)."""
    plt = _plt()
    folder = Path(folder)
    its = [r["iteration"] for r in iterations]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, style in (("E", "o--"), ("T", "s--"), ("ET", "o-")):
        ax.plot(its, [r["errors"][key] for r in iterations], style, label={"ET": "E-T"}.get(key, key))
    ax.set_xlabel("space-search iteration")
    ax.set_ylabel("error (%)")
    ax.set_xticks(its)
    ax.legend()
    paths = [_save(plt, fig, folder / "et_error.png")]
    names = list(iterations[0]["ranges"])
    cols = min(4, len(names))
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3 * cols, 2.2 * rows_), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lo = [min(r["ranges"][name]) for r in iterations]
        hi = [max(r["ranges"][name]) for r in iterations]
        ax.fill_between(its, lo, hi, alpha=0.3)
        for it, r in zip(its, iterations):
            ax.plot([it] * len(r["ranges"][name]), r["ranges"][name], "k.", ms=4)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(its)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(_save(plt, fig, folder / "ranges.png"))
    return paths


def plot_alpha_history(history: Sequence[Mapping[str, Any]], path: str | Path, ops: Sequence[str]) -> Path:
    """DARTS / CDARTS: softmax(α) of every edge over the epochs, one panel per (cell, node, input)."""
    plt = _plt()
    cells = ("normal", "reduce")
    nodes = len(history[-1]["alpha"]["normal"])
    cols = nodes + 1
    fig, axes = plt.subplots(2 * nodes, cols, figsize=(2.2 * cols, 1.6 * 2 * nodes), sharex=True, sharey=True)
    epochs = [h["epoch"] for h in history]
    for c, cell in enumerate(cells):
        for i in range(nodes):
            for j in range(cols):
                ax = axes[c * nodes + i][j]
                if j >= i + 2:
                    ax.axis("off")
                    continue
                for k, op in enumerate(ops):
                    ax.plot(epochs, [h["alpha"][cell][i][j][k] for h in history], label=op, lw=1.2)
                ax.set_title(f"{cell} node {i} <- {j}", fontsize=7)
                ax.tick_params(labelsize=6)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(ops), fontsize=7)
    fig.supxlabel("epoch")
    fig.supylabel("softmax(alpha)")
    return _save(plt, fig, path)


def plot_cells(genotype: Any, path: str | Path) -> Path:
    """A DARTS genotype's normal and reduction cells as graphs: inputs c_{k-2}, c_{k-1}, the nodes, the
    concatenated output; every edge labelled with its op."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (name, cell, concat) in zip(axes, genotype.cells()):
        n = len(cell)
        pos = {0: (0.0, 0.8), 1: (0.0, 0.2)}
        pos.update({k + 2: (0.25 + 0.55 * k / max(n - 1, 1), 0.5 + 0.3 * (-1) ** k) for k in range(n)})
        pos["out"] = (1.0, 0.5)
        names = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"} | {k + 2: str(k) for k in range(n)}
        for i, node in enumerate(cell):
            for op, j in node:
                (x0, y0), (x1, y1) = pos[j], pos[i + 2]
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 1})
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, op, fontsize=7, ha="center", color="tab:blue")
        for k in concat:
            (x0, y0), (x1, y1) = pos[k], pos["out"]
            ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.75", "lw": 0.8})
        for key, (x, y) in pos.items():
            color = "lightblue" if key in (0, 1) else "palegreen" if key == "out" else "khaki"
            ax.text(x, y, names[key], ha="center", va="center", fontsize=9, bbox={"boxstyle": "round", "fc": color})
        ax.set_title(f"{name} cell")
        ax.set_xlim(-0.1, 1.1)
        ax.set_ylim(0.0, 1.0)
        ax.axis("off")
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


def signal_sentence(split_half: Mapping[str, float] | None) -> str | None:
    """One plain sentence on the split-half Kendall tau of random candidates: is there a ranking to search?"""
    if not split_half:
        return None
    tau, p, n = split_half["tau"], split_half["p_value"], split_half["candidates"]
    head = (
        f"ranking signal: the two validation halves rank {n} random candidates with Kendall tau {tau:.2f} (p={p:.2g})"
    )
    if tau >= 0.3 and p < 0.05:
        return head + ": the supernet's scores rank these archs consistently."
    if p < 0.05:
        return head + ": a weak but real ranking; small score differences are mostly noise."
    return head + ": the scores do not rank these archs consistently, so any search here is close to a lottery."


def search_verdict(strategies: Mapping[str, Mapping[str, Any]], paired: Mapping[str, Any] | None = None) -> str | None:
    """One plain sentence: did the main (first) strategy beat random search at equal budget? With `paired`
    (`pipeline.stages.paired_comparison`: McNemar's test on the two best archs' per-image results) the
    difference counts where p < 0.05; without it, where it passes two standard errors of the scores. None
    without a random baseline."""
    names = list(strategies)
    if len(names) < 2 or "random" not in strategies or names[0] == "random":
        return None
    main, rnd = strategies[names[0]], strategies["random"]
    if main.get("best_top1") is None or rnd.get("best_top1") is None:
        return None
    d = main["best_top1"] - rnd["best_top1"]
    if paired:
        b, c, p = paired["main_only"], paired["random_only"], paired["p_value"]
        said = f"right on {b} images random's best misses and wrong on {c} it gets (paired test p={p:.2g})"
        if d > 0 and p < 0.05:
            return f"{names[0]} beat random search by {d:.2f} points: its best is {said}."
        if d > 0:
            return f"{names[0]} did NOT clearly beat random search: its best is {d:.2f} points higher, {said}."
        if d < 0:
            return f"{names[0]} did NOT beat random search: its best is {-d:.2f} points lower, {said}."
    se = math.hypot(main.get("best_top1_standard_error") or 0.0, rnd.get("best_top1_standard_error") or 0.0)
    if d > 2 * se:
        return f"{names[0]} beat random search by {d:.2f} points (more than two standard errors, {2 * se:.2f})."
    if d > 0:
        return (
            f"{names[0]} did NOT clearly beat random search: its best is {d:.2f} points higher, within two "
            f"standard errors ({2 * se:.2f}); on this validation set the two are not told apart."
        )
    if d == 0:
        return f"{names[0]} did NOT beat random search: both found the same best top-1 ({main['best_top1']:.2f}%)."
    return f"{names[0]} did NOT beat random search: its best is {-d:.2f} points lower."


def summary_text(s: dict[str, Any]) -> str:
    """The pipeline's summary.json as the tables `vitnas search` prints."""
    parts: list[str] = []
    b = s["best"]
    parts.append(s["data"])
    sv = s["supernet_val_top1"]
    parts.append(
        f"supernet ({s['space']} space, {s['space_size']:.2e} archs): validation top-1 "
        + ", ".join(f"{k.removeprefix('val_top1_')} {v:.1f}%" for k, v in sv.items())
        + "; test top-1 "
        + ", ".join(f"{k} {v:.1f}%" for k, v in s["supernet_test_top1"].items())
    )
    rows = [
        [name, r["evaluations"], r["best_top1"], f"{r['best_top1_standard_error']:.2f}"]
        for name, r in s["strategies"].items()
    ]
    parts.append("\nsearch (validation top-1 with inherited weights, constraints " + json.dumps(s["constraints"]) + ")")
    parts.append(table(rows, ["strategy", "candidates", "best top-1 %", "+- s.e."]))
    one = 100 / s["val_images"]
    parts.append(
        f"(on {s['val_images']} validation images one image is {one:.2f} points; s.e.: the standard error of one score)"
    )
    for name, r in s["strategies"].items():
        curve = r.get("best_per_generation") or []
        parts.append(f"best so far by generation, {name}: " + " ".join(f"{v:.1f}" for v in curve))
    for line in (signal_sentence(s.get("split_half")), search_verdict(s["strategies"], s.get("paired"))):
        if line:
            parts.append(line)
    parts.append("\nPareto front (accuracy vs parameters)")
    parts.append(
        table(
            [[r["arch"], f"{r['params'] / 1e3:.0f}k", f"{r['macs'] / 1e6:.1f}M", r["top1"]] for r in s["pareto_front"]],
            ["arch", "params", "MACs", "val top-1 %"],
        )
    )
    parts.append("\nbest subnet")
    ft = b["val_top1_finetuned"]
    parts.append(
        table(
            [
                [
                    b["arch"],
                    f"{b['params'] / 1e3:.0f}k",
                    f"{b['macs'] / 1e6:.1f}M",
                    f"{b['latency_ms']:.2f}",
                    b["val_top1_inherited"],
                    "-" if ft is None else ft,
                    b["test_top1"],
                ]
            ],
            ["arch", "params", "MACs", "latency ms", "val (inherited)", "val (fine-tuned)", "test top-1 %"],
        )
    )
    parts.append(f"exported weights: {b['exported_weights']}")
    if s.get("latency_table"):
        lt = s["latency_table"]
        parts.append(f"latency table: mean error {100 * lt['mean_abs_rel_error']:.1f}% over {lt['n']} archs")
    return "\n".join(parts)
