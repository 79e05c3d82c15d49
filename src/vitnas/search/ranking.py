"""Does the supernet rank subnets like stand-alone training does? Arch picks and rank statistics.

`stratified_archs` spreads archs over a space's size range (so a ranking test covers the space, not
one corner of it); `rank_correlation` gives Kendall tau and Spearman rho with paired-bootstrap
intervals; `seed_noise` the run-to-run spread of one arch's accuracy from pairs of seeds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["rank_correlation", "seed_noise", "stratified_archs"]


def stratified_archs(
    space: SearchSpace,
    n: int,
    size: Callable[[ArchConfig], float],
    *,
    seed: int = 0,
    pool: int = 4000,
    feasible: Callable[[ArchConfig], bool] | None = None,
) -> list[ArchConfig]:
    """`n` distinct archs, one per equal-width bin of `size` (e.g. parameters) between the space's
    smallest and largest arch; the two extremes are the end picks. A bin no random sample fell in takes
    the unused sample nearest its centre. Sorted by size."""
    if n < 2:
        raise ValueError(f"stratified_archs: n={n}; expected at least 2 (the smallest and the largest arch)")
    if n > space.size():
        raise ValueError(f"stratified_archs: n={n} but the space '{space.name}' holds only {space.size()} archs")
    feasible = feasible or (lambda arch: True)
    rng = np.random.default_rng([seed, 7919])
    lo_arch, hi_arch = space.smallest(), space.largest()
    samples: dict[str, ArchConfig] = {}
    for _ in range(pool):
        arch = space.sample(rng)
        if arch.key() not in samples and feasible(arch):
            samples[arch.key()] = arch
    for arch in (lo_arch, hi_arch):
        samples.pop(arch.key(), None)
    cand = list(samples.values())
    sizes = np.array([size(a) for a in cand], dtype=float)
    lo, hi = float(size(lo_arch)), float(size(hi_arch))
    edges = np.linspace(lo, hi, n + 1)
    picks = [lo_arch]
    used = np.zeros(len(cand), dtype=bool)
    for b in range(1, n - 1):
        inside = np.flatnonzero((sizes >= edges[b]) & (sizes < edges[b + 1]) & ~used)
        if len(inside):
            i = int(rng.choice(inside))
        else:
            centre = (edges[b] + edges[b + 1]) / 2
            free = np.flatnonzero(~used)
            if not len(free):
                raise ValueError(f"stratified_archs: only {len(picks)} distinct feasible archs found in {pool} samples")
            i = int(free[np.argmin(np.abs(sizes[free] - centre))])
        used[i] = True
        picks.append(cand[i])
    picks.append(hi_arch)
    return sorted(picks, key=size)


def rank_correlation(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Kendall tau (tau-b, ties allowed) and Spearman rho of paired scores, each with a percentile
    bootstrap interval over the pairs, and their p-values."""
    from scipy.stats import bootstrap, kendalltau, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(
            f"rank_correlation: expected two equal-length sequences of 3+ scores, got {x.shape}, {y.shape}"
        )
    out: dict[str, float | list[float]] = {"n": len(x)}
    for name, fn in (("kendall_tau", kendalltau), ("spearman_rho", spearmanr)):
        r = fn(x, y)
        out[name] = float(r.statistic)
        out[name.split("_")[0] + "_p"] = float(r.pvalue)

        def stat(a, b, fn=fn):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a resample may hold one distinct value
                s = fn(a, b).statistic
            return 0.0 if np.isnan(s) else s  # a resample with constant scores ranks nothing

        ci = bootstrap(
            (x, y),
            stat,
            paired=True,
            vectorized=False,
            n_resamples=n_boot,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        out[name + "_ci"] = [float(ci.low), float(ci.high)]
    return out


def seed_noise(a: Sequence[float], b: Sequence[float]) -> float:
    """The standard deviation of one run's score from two seeds of the same archs: sqrt(mean(d^2) / 2)
    over the per-arch differences d (each difference has twice one run's variance)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or not len(d):
        raise ValueError("seed_noise: expected two equal-length, non-empty sequences of scores")
    return float(np.sqrt(np.mean(d**2) / 2))
