"""The search loop: ask the strategy, evaluate new candidates, tell, record; resumable per generation.

Artefacts in the output folder: `candidates.jsonl` (every candidate with its metrics), `state.json`
(strategy state, written atomically each generation), `pareto.json`, `best.yaml`, PNG plots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import vitnas.search.defaults as D
from vitnas._config import check_fields, check_range
from vitnas._io import atomic_write_text
from vitnas.search.constraints import Constraints
from vitnas.search.strategies import Strategy
from vitnas.space.arch import ArchConfig
from vitnas.space.yaml_io import dump_yaml

__all__ = [
    "Halving",
    "SearchConfig",
    "SearchResult",
    "Workers",
    "load_candidates",
    "merge_scores",
    "pareto_front",
    "run_search",
    "torch_workers",
]

log = logging.getLogger(__name__)
Evaluate = Callable[[ArchConfig], Mapping[str, float]]


@dataclass
class SearchConfig:
    # evolution | random | nsga2 | predictor-evolution | board (a Cream board's paths) | darts / cdarts (the genotype
    # a gradient-based search derived; the pipeline then trains with that task)
    strategy: str = D.STRATEGY
    population: int = D.POPULATION
    generations: int = D.GENERATIONS
    parents: int = D.PARENTS  # evolution: top candidates kept as parents
    mutations: int = D.MUTATIONS
    crossovers: int = D.CROSSOVERS
    layer_prob: float = D.LAYER_PROB  # mutation probability of each layer's mlp ratio and heads
    depth_prob: float = D.DEPTH_PROB
    embed_prob: float = D.EMBED_PROB
    predictor: str = D.PREDICTOR  # predictor-evolution: gbr (boosted trees) | rf (random forest) | mlp
    predictor_pool: int = D.PREDICTOR_POOL  # predictor-evolution: archs proposed per evaluated one
    seed: int = D.SEED
    constraints: dict[str, Any] = field(default_factory=dict)  # e.g. {params: [null, 5.0e6], macs: [...]}
    cost: str = D.COST  # the cost of the Pareto front (and NSGA-II's second objective): params | macs | latency_ms
    batch_size: int | None = None  # evaluation batch (None: 64 on a CPU, 256 on a GPU)
    amp: str = D.AMP  # scoring precision: off (fp32) | auto (bf16 where the device runs it natively) | bf16 | fp16
    halving: float = 0.0  # successive halving: share of the validation images that screens every new candidate (0: off)
    halving_keep: float = D.HALVING_KEEP  # successive halving: share of each generation's candidates scored in full
    latency_batch: int = D.LATENCY_BATCH  # batch size at which latency is measured / predicted
    bn_calibration: int = 256  # training images re-estimating a path's BatchNorm statistics before scoring (0: off)
    from_board: bool = False  # start the first generation from the paths of a Cream-trained supernet's board

    def check(self, source: str) -> None:
        from vitnas.search.constraints import COSTS
        from vitnas.search.strategies import STRATEGIES

        check_fields(self, source)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{source}: strategy={self.strategy!r}; expected one of {sorted(STRATEGIES)}")
        if self.cost not in COSTS:
            raise ValueError(f"{source}: cost={self.cost!r}; expected one of {list(COSTS)}")
        from vitnas.search.predictor import PREDICTORS

        if self.predictor not in PREDICTORS:
            raise ValueError(f"{source}: predictor={self.predictor!r}; expected one of {list(PREDICTORS)}")
        for name in ("population", "generations", "parents", "batch_size", "latency_batch", "predictor_pool"):
            check_range(source, name, getattr(self, name), 1)  # batch_size None: the device's default
        for name in ("mutations", "crossovers", "seed", "bn_calibration"):
            check_range(source, name, getattr(self, name), 0)
        for name in ("layer_prob", "depth_prob", "embed_prob"):
            check_range(source, name, getattr(self, name), 0.0, 1.0)
        from vitnas.precision import AMP_MODES

        if self.amp not in AMP_MODES:
            raise ValueError(f"{source}: amp={self.amp!r}; expected one of {AMP_MODES}")
        if not 0.0 <= self.halving < 1.0:
            raise ValueError(
                f"{source}: halving={self.halving}; expected 0 (off) or a share of the validation images in (0, 1)"
            )
        if not 0.0 < self.halving_keep <= 1.0:
            raise ValueError(f"{source}: halving_keep={self.halving_keep}; expected a share of candidates in (0, 1]")
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
        obj.check(source)
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
            predictor=self.predictor,
            pool=self.predictor_pool,
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


_ARTEFACTS = ("candidates.jsonl", "state.json", "config.json", "pareto.json", "best.yaml", "progress.json")


def _identity(
    strategy: Strategy, constraints: Constraints, cost: str, config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What identifies a run, as it reads back from JSON (so a resume compares equal values)."""
    identity = {"strategy": type(strategy).__name__, "constraints": constraints.to_dict(), "cost": cost}
    return json.loads(json.dumps({**identity, **dict(config or {})}, default=str))


def _claim_folder(out: Path, identity: dict[str, Any], resume: bool) -> None:
    """Clear the folder's artefacts (no `resume`) or check that it holds a run of the same identity,
    then record the identity."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if not resume:
        for name in _ARTEFACTS:
            (out / name).unlink(missing_ok=True)
    if cfg_path.is_file():
        diff = _diff(json.loads(cfg_path.read_text()), identity)
        if diff:
            raise ValueError(
                f"{out} holds a search made with other settings ({diff}); "
                f"start over with --fresh or use another output folder"
            )
    atomic_write_text(cfg_path, json.dumps(identity, indent=1))


def _load_cache(cand_path: Path) -> dict[str, dict[str, Any]]:
    """The evaluated candidates by key. What survived is rewritten (a line cut by a crash is dropped),
    so appends start on a fresh line."""
    cache = {row["key"]: row for row in load_candidates(cand_path)}
    atomic_write_text(cand_path, "".join(json.dumps(r) + "\n" for r in cache.values()))
    return cache


def _best_per_generation(rows: list[dict[str, Any]], generations: int) -> list[float]:
    """The best top1 found up to each finished generation (NaN before any candidate)."""
    rows = _finished(rows)
    return [max((r["top1"] for r in rows if r["generation"] <= g), default=float("nan")) for g in range(generations)]


def _evaluate_new(
    arch: ArchConfig,
    gen: int,
    evaluate: Evaluate,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
) -> dict[str, Any]:
    """The candidate row of an arch not evaluated before: its metrics and costs."""
    key = arch.key()
    c = {name: float(fn(arch)) for name, fn in costs.items()}
    if not constraints.satisfied(c):
        raise AssertionError(f"strategy proposed {key} outside the constraints {constraints.to_dict()}")
    metrics = dict(evaluate(arch))
    return {"key": key, "generation": gen, "arch": arch.to_dict(), **metrics, **c}


@dataclass(frozen=True)
class Workers:
    """The processes one search is spread over (`torch_workers()` under torchrun). Each rank evaluates a
    disjoint share of every generation's new candidates with the full validation split; `gather(rows)`
    (called by every rank in step) returns all ranks' rows, so every rank tells its strategy the same
    scores and the runs stay identical. Only rank 0 writes the artefacts."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]]] | None = None
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torch_workers() -> Workers:
    """The Workers of the torch.distributed process group (one process: a plain Workers())."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return Workers()

    def gather(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, rows)
        return out

    return Workers(dist.get_rank(), dist.get_world_size(), gather, dist.barrier)


@dataclass(frozen=True)
class Halving:
    """Successive halving inside each generation. Every new candidate is scored by `screen` (a share of the
    validation split, `screen_images` images); the best `keep` share of them, by Pareto rank on (screening
    top-1, cost) and then top-1, is also scored by `finish` (the other `finish_images`), and its metrics
    become the image-weighted means of both parts: exactly its score on the whole split. The others keep
    their screening metrics and are marked `screened_out`: the strategy is told them, but they are never
    the best nor on the Pareto front. Rows are written when their generation ends."""

    screen: Evaluate
    finish: Evaluate
    screen_images: int
    finish_images: int
    keep: float = D.HALVING_KEEP

    def promote(self, rows: list[dict[str, Any]], cost: str) -> set[str]:
        """Keys of the rows (one generation's screened candidates) that are scored in full."""
        if not rows:
            return set()
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        F = np.array([[-r["top1"], r[cost]] for r in rows], dtype=float)
        rank = np.empty(len(rows), dtype=int)
        for i, front in enumerate(NonDominatedSorting().do(F)):
            rank[front] = i
        order = sorted(
            range(len(rows)), key=lambda i: (rank[i], -rows[i]["top1"], rows[i].get("loss", 0.0), rows[i]["key"])
        )
        return {rows[i]["key"] for i in order[: max(1, math.ceil(self.keep * len(rows)))]}

    def combine(self, screen: Mapping[str, Any], finish: Mapping[str, float]) -> dict[str, Any]:
        """A promoted candidate's row: every metric of `finish` as the image-weighted mean of both parts."""
        merged = merge_scores(screen, self.screen_images, finish, self.finish_images)
        return {**screen, **merged, "val_images": self.screen_images + self.finish_images}


def merge_scores(a: Mapping[str, Any], n_a: int, b: Mapping[str, float], n_b: int) -> dict[str, float]:
    """Metrics of two disjoint parts of a split (`n_a` and `n_b` images) as the whole split's: the
    image-weighted mean of every metric of `b`."""
    return {k: (a[k] * n_a + v * n_b) / (n_a + n_b) for k, v in b.items()}


def _evaluate_shared(
    archs: list[ArchConfig], fn: Callable[[ArchConfig], dict[str, Any]], workers: Workers
) -> dict[str, dict[str, Any]]:
    """fn(arch) for this rank's share of `archs`, gathered from every rank: {key: row}."""
    mine = [fn(a) for a in archs[workers.rank :: workers.world]]
    gathered = workers.gather(mine) if workers.world > 1 else [mine]
    return {row["key"]: row for rows in gathered for row in rows}


def _halving_rows(
    todo: list[ArchConfig],
    gen: int,
    halving: Halving,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
    cost: str,
    workers: Workers,
) -> list[dict[str, Any]]:
    """The rows of a generation's new archs under successive halving, in the order of `todo`."""
    screened = _evaluate_shared(todo, lambda a: _evaluate_new(a, gen, halving.screen, costs, constraints), workers)
    rows = [screened[a.key()] for a in todo]
    promoted = halving.promote(rows, cost)
    finished = _evaluate_shared(
        [a for a in todo if a.key() in promoted], lambda a: {"key": a.key(), **halving.finish(a)}, workers
    )
    out = []
    for row in rows:
        if row["key"] in promoted:
            metrics = {k: v for k, v in finished[row["key"]].items() if k != "key"}
            out.append(halving.combine(row, metrics))
        else:
            out.append({**row, "val_images": halving.screen_images, "screened_out": True})
    return out


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows scored on the whole validation split (all of them unless successive halving screened some out)."""
    return [r for r in rows if not r.get("screened_out")]


def _rows_as_evaluated(
    archs: list[ArchConfig],
    todo: list[ArchConfig],
    gen: int,
    evaluate: Evaluate,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
    cache: dict[str, dict[str, Any]],
    cand_path: Path,
    progress: Callable[[int, int, dict[str, Any]], None] | None,
    workers: Workers,
) -> list[dict[str, Any]]:
    """This rank's share of `todo` evaluated in the order asked (one process: each row on disk as soon as
    evaluated), every rank's rows gathered into `cache` and (rank 0) `cand_path`; the new rows."""
    mine_keys = {a.key() for a in todo[workers.rank :: workers.world]}
    with open(cand_path, "a") if workers.is_main else contextlib.nullcontext() as f:
        mine: dict[str, dict[str, Any]] = {}
        for i, arch in enumerate(archs):
            key = arch.key()
            if key in mine_keys and key not in mine:
                mine[key] = _evaluate_new(arch, gen, evaluate, costs, constraints)
                if workers.world == 1:  # one process: on disk as soon as evaluated
                    f.write(json.dumps(mine[key]) + "\n")
                    f.flush()
            row = cache.get(key) or mine.get(key)
            if progress and row is not None:
                progress(gen, i, row)
        mine = list(mine.values())
        gathered = workers.gather(mine) if workers.world > 1 else [mine]
        by_key = {row["key"]: row for rows in gathered for row in rows}
        new = [by_key[a.key()] for a in todo]
        cache.update(by_key)
        if f is not None:
            if workers.world > 1:
                f.writelines(json.dumps(row) + "\n" for row in new)
            f.flush()
            os.fsync(f.fileno())  # the rows are on disk before the state that counts them
    return new


def _run_generation(
    strategy: Strategy,
    evaluate: Evaluate,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
    cache: dict[str, dict[str, Any]],
    cand_path: Path,
    progress: Callable[[int, int, dict[str, Any]], None] | None,
    workers: Workers,
    halving: Halving | None = None,
    cost: str = D.COST,
) -> tuple[list[ArchConfig], list[dict[str, Any]]]:
    """Ask; evaluate this rank's share of the archs not in `cache`; gather every rank's rows; add them to
    `cache` and (rank 0) `cand_path`, in the order asked; tell. Returns the archs and the new rows."""
    gen = strategy.generation
    archs = strategy.ask()
    todo = list({a.key(): a for a in archs if a.key() not in cache}.values())
    if halving is not None:
        new = _halving_rows(todo, gen, halving, costs, constraints, cost, workers)
        cache.update((row["key"], row) for row in new)
        if workers.is_main:
            with open(cand_path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in new)
                f.flush()
                os.fsync(f.fileno())
        for i, arch in enumerate(archs):
            if progress:
                progress(gen, i, cache[arch.key()])
    else:
        new = _rows_as_evaluated(archs, todo, gen, evaluate, costs, constraints, cache, cand_path, progress, workers)
    strategy.tell(archs, [cache[a.key()]["top1"] for a in archs])
    return archs, new


def _write_results(
    out: Path, best: dict[str, Any] | None, front: list[dict[str, Any]], best_per_gen: list[float]
) -> None:
    atomic_write_text(out / "pareto.json", json.dumps(front, indent=1))
    atomic_write_text(out / "progress.json", json.dumps({"best_per_generation": best_per_gen}))
    if best is not None:
        dump_yaml(best["arch"], out / "best.yaml")  # the arch's own to_yaml form, whatever its space


def _name(strategy: Strategy) -> str:
    return getattr(strategy, "name", type(strategy).__name__)


def run_search(
    strategy: Strategy,
    evaluate: Evaluate,
    *,
    costs: Mapping[str, Callable[[ArchConfig], float]],
    constraints: Constraints,
    out_dir: str | Path,
    cost: str = D.COST,
    resume: bool = True,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    config: Mapping[str, Any] | None = None,
    workers: Workers | None = None,
    halving: Halving | None = None,
) -> SearchResult:
    """Run `strategy` to the end. Every proposed arch meets `constraints` (strategies are built with the
    same feasibility test) and is evaluated at most once, even across a resume. `config` identifies the
    run (settings, supernet checkpoint): resuming a folder made with another config is an error.
    `workers` spreads the evaluations over ranks (every rank calls run_search; `out_dir` is shared).
    `halving` screens each generation's new candidates on part of the validation split (`evaluate` is
    then unused)."""
    workers = workers or Workers()
    out = Path(out_dir)
    cand_path, state_path = out / "candidates.jsonl", out / "state.json"
    if workers.is_main:
        _claim_folder(out, _identity(strategy, constraints, cost, config), resume)
        cache = _load_cache(cand_path)
    workers.barrier()
    if not workers.is_main:
        cache = {row["key"]: row for row in load_candidates(cand_path)}
    if state_path.is_file():
        strategy.load_state_dict(json.loads(state_path.read_text())["strategy"])
        log.info(
            "resumed %s search at generation %d with %d evaluated candidates",
            _name(strategy),
            strategy.generation,
            len(cache),
        )
    workers.barrier()  # every rank has read the state before rank 0 writes the next one
    rows = list(cache.values())
    best_per_gen = _best_per_generation(rows, strategy.generation)
    evaluations = 0
    while not strategy.done:
        gen = strategy.generation
        archs, new = _run_generation(
            strategy, evaluate, costs, constraints, cache, cand_path, progress, workers, halving, cost
        )
        evaluations += len(new)
        rows += new
        best_per_gen.append(max((r["top1"] for r in _finished(rows)), default=float("nan")))
        if workers.is_main:
            atomic_write_text(state_path, json.dumps({"strategy": strategy.state_dict()}))
        log.info("%s generation %d: %d candidates, best top1 %.2f", _name(strategy), gen, len(archs), best_per_gen[-1])
    rows = [r for r in rows if constraints.satisfied(r)]
    finished = _finished(rows)
    front = pareto_front(finished, cost)
    # ties in top-1 (a score moves in steps of one image) go to the lower validation loss, then the cheaper
    best = max(finished, key=lambda r: (r["top1"], -r.get("loss", 0.0), -r[cost])) if finished else None
    if workers.is_main:
        _write_results(out, best, front, best_per_gen)
    workers.barrier()
    return SearchResult(rows, best, front, best_per_gen, evaluations, out)
