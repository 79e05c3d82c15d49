"""Architecture search: strategies, constraints, the evaluator and the resumable search loop."""

from vitnas.search.constraints import Constraints, InfeasibleConstraint
from vitnas.search.run import Halving, SearchConfig, SearchResult, Workers, pareto_front, run_search, torch_workers
from vitnas.search.strategies import STRATEGIES, EvolutionSearch, NSGA2Search, RandomSearch, build_strategy

__all__ = [
    "STRATEGIES",
    "Constraints",
    "EvolutionSearch",
    "Halving",
    "InfeasibleConstraint",
    "NSGA2Search",
    "RandomSearch",
    "SearchConfig",
    "SearchResult",
    "Workers",
    "build_strategy",
    "pareto_front",
    "run_search",
    "torch_workers",
]
