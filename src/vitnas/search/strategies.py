"""Search strategies with one interface: `ask() -> archs`, `tell(archs, scores)`, `state_dict()`.

Each owns a seeded numpy Generator, proposes only feasible archs it has not proposed before (so no
candidate is ever evaluated twice) and stops after its number of generations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from vitnas.search.defaults import (
    CROSSOVERS,
    DEPTH_PROB,
    EMBED_PROB,
    GENERATIONS,
    LAYER_PROB,
    MAX_TRIES,
    MUTATIONS,
    PARENTS,
    POPULATION,
    SEED,
)
from vitnas.search.predictor import MIN_FIT, AccuracyPredictor
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = [
    "STRATEGIES",
    "EvolutionSearch",
    "NSGA2Search",
    "PredictorEvolutionSearch",
    "RandomSearch",
    "Strategy",
    "build_strategy",
]

log = logging.getLogger(__name__)
Feasible = Callable[[ArchConfig], bool]


class Strategy(Protocol):
    generation: int

    @property
    def done(self) -> bool: ...

    def ask(self) -> list[ArchConfig]: ...

    def tell(self, archs: Sequence[ArchConfig], scores: Sequence[float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Base:
    def __init__(
        self,
        space: SearchSpace,
        *,
        feasible: Feasible | None = None,
        population: int = POPULATION,
        generations: int = GENERATIONS,
        seed: int = SEED,
        max_tries: int = MAX_TRIES,
        initial: Sequence[ArchConfig] = (),
    ) -> None:
        self.space = space
        self.initial = list(initial)  # archs the first generation starts with (e.g. a Cream board's paths)
        self.feasible = feasible or (lambda arch: True)
        self.population = population
        self.generations = generations
        self.seed = seed
        self.max_tries = max_tries
        self.rng = np.random.default_rng(seed)
        self.generation = 0
        self.seen: set[str] = set()
        self.scores: dict[str, float] = {}
        self.archs: dict[str, ArchConfig] = {}

    @property
    def done(self) -> bool:
        return self.generation >= self.generations

    def _accept(self, arch: ArchConfig, batch: list[ArchConfig]) -> bool:
        key = arch.key()
        if key in self.seen or not self.feasible(arch):
            return False
        self.seen.add(key)
        batch.append(arch)
        return True

    def _initial(self, batch: list[ArchConfig]) -> None:
        """The given starting archs (feasible, unseen) open the first generation, up to its size."""
        if self.generation == 0:
            for arch in self.initial[: self.population]:
                self._accept(arch, batch)

    def _random(self, n: int, batch: list[ArchConfig]) -> None:
        tries = 0
        target = len(batch) + n
        while len(batch) < target and tries < self.max_tries:
            tries += 1
            self._accept(self.space.sample(self.rng), batch)
        if len(batch) < target:
            log.warning("found only %d of %d new feasible archs in %d random tries", len(batch), target, tries)

    def tell(self, archs: Sequence[ArchConfig], scores: Sequence[float]) -> None:
        for arch, score in zip(archs, scores, strict=True):
            self.scores[arch.key()] = float(score)
            self.archs[arch.key()] = arch
        self.generation += 1

    def best(self, k: int = 1) -> list[tuple[ArchConfig, float]]:
        keys = sorted(self.scores, key=lambda key: -self.scores[key])[:k]
        return [(self.archs[key], self.scores[key]) for key in keys]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "seed": self.seed,
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
            "seen": sorted(self.seen),
            "scores": [[self.archs[k].to_dict(), s] for k, s in self.scores.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state of a {state.get('kind')} search cannot resume a {type(self).__name__}")
        self.generation = int(state["generation"])
        self.rng.bit_generator.state = state["rng"]
        self.seen = set(state["seen"])
        self.scores, self.archs = {}, {}
        for arch_dict, score in state["scores"]:
            arch = self.space.arch_from_dict(arch_dict, source="search state")
            self.scores[arch.key()] = float(score)
            self.archs[arch.key()] = arch


class RandomSearch(_Base):
    name = "random"
    """`population` new random feasible archs per generation: the baseline at equal budget."""

    def ask(self) -> list[ArchConfig]:
        batch: list[ArchConfig] = []
        self._initial(batch)
        self._random(self.population - len(batch), batch)
        return batch


class BoardSearch(_Base):
    name = "board"
    """Cream's search result: the prioritized paths its supernet training kept (`initial`), scored once on
    the validation split, no further search. Infeasible board paths are skipped."""

    def __init__(self, space: SearchSpace, *, initial: Sequence[ArchConfig] = (), **kwargs: Any) -> None:
        if not initial:
            raise ValueError("strategy 'board' needs the board of a Cream-trained supernet (train with task cream)")
        kwargs["generations"] = 1
        kwargs["population"] = max(len(initial), 1)
        super().__init__(space, initial=initial, **kwargs)

    def ask(self) -> list[ArchConfig]:
        batch: list[ArchConfig] = []
        self._initial(batch)
        if not batch:
            log.warning("no path on the board satisfies the constraints")
        return batch


class DerivedSearch(BoardSearch):
    name = "derived"
    """Gradient-based search's result: the genotype its trained architecture weights derive (`initial`),
    scored once on the validation split. Registered as "darts" and "cdarts" (the training task that made it)."""

    def __init__(self, space: SearchSpace, *, initial: Sequence[ArchConfig] = (), **kwargs: Any) -> None:
        if not initial:
            raise ValueError(f"strategy {self.name!r} needs the genotype of a supernet trained with task {self.name!r}")
        super().__init__(space, initial=initial, **kwargs)


class DartsDerived(DerivedSearch):
    name = "darts"


class CDARTSDerived(DerivedSearch):
    name = "cdarts"


class EvolutionSearch(_Base):
    name = "evolution"
    """AutoFormer's evolution: keep the top `parents`; each generation makes `mutations` mutants and
    `crossovers` children of same-depth parent pairs, then tops up with random archs."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        feasible: Feasible | None = None,
        population: int = POPULATION,
        parents: int = PARENTS,
        mutations: int = MUTATIONS,
        crossovers: int = CROSSOVERS,
        layer_prob: float = LAYER_PROB,
        depth_prob: float = DEPTH_PROB,
        embed_prob: float = EMBED_PROB,
        generations: int = GENERATIONS,
        seed: int = SEED,
        max_tries: int = MAX_TRIES,
        initial: Sequence[ArchConfig] = (),
    ) -> None:
        super().__init__(
            space,
            feasible=feasible,
            population=population,
            generations=generations,
            seed=seed,
            max_tries=max_tries,
            initial=initial,
        )
        self.parents = parents
        self.mutations = mutations
        self.crossovers = crossovers
        self.layer_prob, self.depth_prob, self.embed_prob = layer_prob, depth_prob, embed_prob

    def ask(self) -> list[ArchConfig]:
        batch: list[ArchConfig] = []
        self._initial(batch)
        top = [a for a, _ in self.best(self.parents)]
        if top:
            tries = 0
            while len(batch) < self.mutations and tries < 10 * self.mutations:
                tries += 1
                parent = top[int(self.rng.integers(len(top)))]
                self._accept(
                    self.space.mutate(
                        parent,
                        self.rng,
                        layer_prob=self.layer_prob,
                        depth_prob=self.depth_prob,
                        embed_prob=self.embed_prob,
                    ),
                    batch,
                )
            n_mut = len(batch)
            tries = 0
            while len(batch) - n_mut < self.crossovers and tries < 10 * self.crossovers:
                tries += 1
                a, b = (top[int(i)] for i in self.rng.integers(len(top), size=2))
                for _ in range(50):  # as the reference: redraw until both parents have the same depth
                    if a.depth == b.depth:
                        break
                    a, b = (top[int(i)] for i in self.rng.integers(len(top), size=2))
                self._accept(self.space.crossover(a, b, self.rng), batch)
        self._random(max(self.population - len(batch), 0), batch)
        return batch


class NSGA2Search(_Base):
    name = "nsga2"
    """Multi-objective search (accuracy vs a cost) with pymoo's NSGA-II over an integer encoding.

    Genes: the space's `genome_upper()` / `from_genome()` (ViT: depth, embed_dim, then mlp_ratio and
    num_heads for every possible layer; MBConv: stage depths, then every layer slot's op; slots past a
    depth are ignored). Infeasible or already-seen genomes are never evaluated: they get the
    worst objectives (or their recorded score) directly.
    """

    def __init__(
        self,
        space: SearchSpace,
        *,
        cost: Callable[[ArchConfig], float],
        feasible: Feasible | None = None,
        population: int = POPULATION,
        generations: int = GENERATIONS,
        seed: int = SEED,
        max_tries: int = MAX_TRIES,
        initial: Sequence[ArchConfig] = (),
    ) -> None:
        super().__init__(
            space,
            feasible=feasible,
            population=population,
            generations=generations,
            seed=seed,
            max_tries=max_tries,
            initial=initial,
        )
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        self.cost = cost
        upper = space.genome_upper()
        problem = Problem(
            n_var=len(upper), n_obj=2, xl=np.zeros(len(upper)), xu=np.array(upper, dtype=float), vtype=int
        )
        self._algo = NSGA2(
            pop_size=population,
            sampling=IntegerRandomSampling(),
            crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
            mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
            eliminate_duplicates=True,
        )
        self._algo.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
        self._pending = None
        self._told: list[list[Any]] = []

    def decode(self, x: np.ndarray) -> ArchConfig:
        return self.space.from_genome(x)

    def ask(self) -> list[ArchConfig]:
        self._pending = self._algo.ask()
        batch: list[ArchConfig] = []
        for x in self._pending.get("X"):
            self._accept(self.decode(x), batch)
        return batch

    def tell(self, archs: Sequence[ArchConfig], scores: Sequence[float]) -> None:
        for arch, score in zip(archs, scores, strict=True):
            self.scores[arch.key()] = float(score)
            self.archs[arch.key()] = arch
        self._told.append([[a.to_dict() for a in archs], [float(s) for s in scores]])
        F = []
        for x in self._pending.get("X"):
            arch = self.decode(x)
            key = arch.key()
            if key in self.scores:
                F.append([-self.scores[key], self.cost(arch)])
            else:  # infeasible: never evaluated, dominated by everything
                F.append([1e9, 1e18])
        self._pending.set("F", np.array(F, dtype=float))
        self._algo.tell(infills=self._pending)
        self._pending = None
        self.generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "seed": self.seed, "generation": self.generation, "told": self._told}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the recorded generations (no evaluation): pymoo's state is rebuilt exactly."""
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state of a {state.get('kind')} search cannot resume a {type(self).__name__}")
        for archs, scores in state["told"]:
            asked = self.ask()
            want = [self.space.arch_from_dict(a, source="search state") for a in archs]
            if asked != want:
                raise ValueError("NSGA-II replay diverged from the saved run (different seed or settings?)")
            self.tell(asked, scores)


class PredictorEvolutionSearch(EvolutionSearch):
    name = "predictor-evolution"
    """Evolution whose every generation proposes `pool` x `population` new archs (AutoFormer's mutation,
    crossover and random proposals, in evolution's proportions), fits the predictor on every candidate
    evaluated so far, and evaluates only the `population` archs it predicts best. Until `MIN_FIT`
    candidates are scored, generations are plain evolution. Evaluations per generation are
    evolution's, so the two compare at equal evaluation budget. The predictor is refitted from the
    recorded scores, so a resumed run continues exactly."""

    def __init__(self, space: SearchSpace, *, predictor: str = "gbr", pool: int = 10, **kwargs: Any) -> None:
        super().__init__(space, **kwargs)
        if pool < 1:
            raise ValueError(f"predictor_pool={pool}; expected at least 1")
        AccuracyPredictor(space, predictor)  # checks the kind now, not at generation 1
        self.predictor, self.pool = predictor, pool
        self._predicted: dict[str, float] = {}

    def ask(self) -> list[ArchConfig]:
        if len(self.scores) < MIN_FIT or self.pool == 1:
            return super().ask()
        seen = set(self.seen)
        proposals: list[ArchConfig] = []
        for _ in range(self.pool):  # each round marks its archs seen, so the rounds never repeat one
            proposals += super().ask()
        self.seen = seen
        keys = sorted(self.scores)
        model = AccuracyPredictor(self.space, self.predictor, seed=self.seed + self.generation)
        model.fit([self.archs[k] for k in keys], [self.scores[k] for k in keys])
        pred = model.predict(proposals)
        order = np.argsort(-pred, kind="stable")[: self.population]
        batch = [proposals[i] for i in order]
        self.seen.update(a.key() for a in batch)
        self._predicted = {a.key(): float(pred[i]) for a, i in zip(batch, order, strict=True)}
        log.info(
            "predictor (%s, fitted on %d): %d of %d proposals chosen, predicted top1 %.2f-%.2f",
            self.predictor,
            len(keys),
            len(batch),
            len(proposals),
            float(pred[order[-1]]) if len(order) else float("nan"),
            float(pred[order[0]]) if len(order) else float("nan"),
        )
        return batch

    def tell(self, archs: Sequence[ArchConfig], scores: Sequence[float]) -> None:
        pairs = [
            (self._predicted[a.key()], s) for a, s in zip(archs, scores, strict=True) if a.key() in self._predicted
        ]
        if len(pairs) >= 3:
            from scipy.stats import kendalltau

            tau = kendalltau(*zip(*pairs, strict=True)).statistic
            log.info(
                "predictor on generation %d: Kendall tau %.2f between predicted and measured", self.generation, tau
            )
        self._predicted = {}
        super().tell(archs, scores)


STRATEGIES = {
    cls.name: cls
    for cls in (
        EvolutionSearch,
        RandomSearch,
        NSGA2Search,
        PredictorEvolutionSearch,
        BoardSearch,
        DartsDerived,
        CDARTSDerived,
    )
}


def build_strategy(name: str, space: SearchSpace, **kwargs: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    if name == "nsga2" and kwargs.pop("initial", None):
        raise ValueError("strategy nsga2 does not take starting archs (from_board); use evolution or board")
    if name != "nsga2":
        kwargs.pop("cost", None)
    if name != "predictor-evolution":
        kwargs.pop("predictor", None)
        kwargs.pop("pool", None)
    if name not in ("evolution", "predictor-evolution"):
        for key in ("parents", "mutations", "crossovers", "layer_prob", "depth_prob", "embed_prob"):
            kwargs.pop(key, None)
    return cls(space, **kwargs)
