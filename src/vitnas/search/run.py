"""The search loop: ask the strategy, evaluate new candidates, tell, record; resumable per generation.

Artefacts in the output folder: `candidates.jsonl` (every candidate with its metrics), `state.json`
(strategy state, written atomically each generation), `pareto.json`, `best.yaml`, PNG plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitnas._config import check_fields, check_range
from vitnas._io import atomic_write_text
from vitnas.search.constraints import Constraints
from vitnas.search.strategies import Strategy
from vitnas.space.arch import ArchConfig

__all__ = ["SearchConfig", "SearchResult", "run_search", "pareto_front", "load_candidates"]

log = logging.getLogger(__name__)
Evaluate = Callable[[ArchConfig], Mapping[str, float]]


@dataclass
class SearchConfig:
    strategy: str = "evolution"  # evolution | random | nsga2
    population: int = 50
    generations: int = 20
    parents: int = 10  # evolution: top candidates kept as parents
    mutations: int = 25
    crossovers: int = 25
    layer_prob: float = 0.2  # mutation probability of each layer's mlp ratio and heads
    depth_prob: float = 0.4
    embed_prob: float = 0.4
    seed: int = 0
    constraints: dict[str, Any] = field(default_factory=dict)  # e.g. {params: [null, 5.0e6], macs: [...]}
    cost: str = "params"  # the cost of the Pareto front (and NSGA-II's second objective): params | macs | latency_ms
    batch_size: int = 256  # evaluation batch
    latency_batch: int = 1  # batch size at which latency is measured / predicted

    def validate(self, source: str) -> None:
        from vitnas.search.constraints import COSTS
        from vitnas.search.strategies import STRATEGIES

        check_fields(self, source)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{source}: strategy={self.strategy!r}; expected one of {sorted(STRATEGIES)}")
        if self.cost not in COSTS:
            raise ValueError(f"{source}: cost={self.cost!r}; expected one of {list(COSTS)}")
        for name in ("population", "generations", "parents", "batch_size", "latency_batch"):
            check_range(source, name, getattr(self, name), 1)
        for name in ("mutations", "crossovers", "seed"):
            check_range(source, name, getattr(self, name), 0)
        for name in ("layer_prob", "depth_prob", "embed_prob"):
            check_range(source, name, getattr(self, name), 0.0, 1.0)
        Constraints.from_dict(self.constraints, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "search") -> SearchConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of search settings, got {data!r}")
        names = list(cls.__dataclass_fields__)
        for key in data:
            if key not in names:
                raise ValueError(f"{source}: unknown key {key!r}; expected one of {names}")
        obj = cls(**data)
        obj.validate(source)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def strategy_kwargs(self) -> dict[str, Any]:
        return dict(
            population=self.population,
            generations=self.generations,
            seed=self.seed,
            parents=self.parents,
            mutations=self.mutations,
            crossovers=self.crossovers,
            layer_prob=self.layer_prob,
            depth_prob=self.depth_prob,
            embed_prob=self.embed_prob,
        )


@dataclass
class SearchResult:
    candidates: list[dict[str, Any]]
    best: dict[str, Any] | None
    front: list[dict[str, Any]]
    best_per_generation: list[float]
    evaluations: int
    out_dir: Path


def load_candidates(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: the candidate is evaluated again
                log.warning("%s:%d: ignoring a truncated line", path, i + 1)
    return rows


def pareto_front(rows: list[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    """Candidates not dominated in (higher top1, lower cost), by cost."""
    if not rows:
        return []
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.array([[-r["top1"], r[cost]] for r in rows], dtype=float)
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((rows[i] for i in idx), key=lambda r: r[cost])


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} then, {b.get(key)!r} now"
    return None


def run_search(
    strategy: Strategy,
    evaluate: Evaluate,
    *,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
    out_dir: str | Path,
    cost: str = "params",
    resume: bool = True,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Run `strategy` to the end. Every proposed arch meets `constraints` (strategies are built with the
    same feasibility test) and is evaluated at most once, even across a resume. `config` identifies the
    run (settings, supernet checkpoint): resuming a folder made with another config is an error."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cand_path, state_path, cfg_path = out / "candidates.jsonl", out / "state.json", out / "config.json"
    identity = json.loads(
        json.dumps(
            {
                "strategy": type(strategy).__name__,
                "constraints": constraints.to_dict(),
                "cost": cost,
                **dict(config or {}),
            },
            default=str,
        )
    )
    if not resume:
        for name in ("candidates.jsonl", "state.json", "config.json", "pareto.json", "best.yaml", "progress.json"):
            (out / name).unlink(missing_ok=True)
    if cfg_path.is_file():
        diff = _diff(json.loads(cfg_path.read_text()), identity)
        if diff:
            raise ValueError(
                f"{out} holds a search made with other settings ({diff}); "
                f"start over with --fresh or use another output folder"
            )
    atomic_write_text(cfg_path, json.dumps(identity, indent=1))
    cache: dict[str, dict[str, Any]] = {row["key"]: row for row in load_candidates(cand_path)}
    # Rewrite what survived (a line cut by a crash is dropped), so appends start on a fresh line.
    atomic_write_text(cand_path, "".join(json.dumps(r) + "\n" for r in cache.values()))
    if state_path.is_file():
        strategy.load_state_dict(json.loads(state_path.read_text())["strategy"])
        log.info("resumed search at generation %d with %d evaluated candidates", strategy.generation, len(cache))
    rows = list(cache.values())
    best_per_gen = [
        max((r["top1"] for r in rows if r["generation"] <= g), default=float("nan")) for g in range(strategy.generation)
    ]
    evaluations = 0
    while not strategy.done:
        gen = strategy.generation
        archs = strategy.ask()
        scores = []
        with open(cand_path, "a") as f:
            for i, arch in enumerate(archs):
                key = arch.key()
                row = cache.get(key)
                if row is None:
                    c = {name: float(fn(arch)) for name, fn in costs.items()}
                    if not constraints.satisfied(c):
                        raise AssertionError(f"strategy proposed {key} outside the constraints {constraints.to_dict()}")
                    metrics = dict(evaluate(arch))
                    evaluations += 1
                    row = {"key": key, "generation": gen, "arch": arch.to_dict(), **metrics, **c}
                    cache[key] = row
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                scores.append(row["top1"])
                if progress:
                    progress(gen, i, row)
            os.fsync(f.fileno())  # the rows are on disk before the state that counts them
        strategy.tell(archs, scores)
        best_per_gen.append(max(r["top1"] for r in rows) if rows else float("nan"))
        atomic_write_text(state_path, json.dumps({"strategy": strategy.state_dict()}))
        log.info("generation %d: %d candidates, best top1 %.2f", gen, len(archs), best_per_gen[-1])
    rows = [r for r in rows if constraints.satisfied(r)]
    front = pareto_front(rows, cost)
    best = max(rows, key=lambda r: (r["top1"], -r[cost])) if rows else None
    atomic_write_text(out / "pareto.json", json.dumps(front, indent=1))
    atomic_write_text(out / "progress.json", json.dumps({"best_per_generation": best_per_gen}))
    if best is not None:
        ArchConfig.from_dict(best["arch"]).to_yaml(out / "best.yaml")
    return SearchResult(rows, best, front, best_per_gen, evaluations, out)
