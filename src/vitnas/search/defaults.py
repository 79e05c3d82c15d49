"""Search defaults, defined once: strategies, the search loop, the evaluator and `SearchConfig` use these.

AutoFormer's mutation probabilities belong to `SearchSpace.mutate` (`vitnas.space.space`, the layer
below) and are re-exported here, so every search default can be read in one place.
"""

from __future__ import annotations

from vitnas.space.space import DEPTH_PROB, EMBED_PROB, LAYER_PROB

__all__ = [
    "AMP",
    "COST",
    "CROSSOVERS",
    "DEPTH_PROB",
    "EMBED_PROB",
    "EVAL_BATCH",
    "EVAL_BATCH_CPU",
    "GENERATIONS",
    "HALVING_KEEP",
    "LATENCY_BATCH",
    "LAYER_PROB",
    "MAX_TRIES",
    "MUTATIONS",
    "PARENTS",
    "POPULATION",
    "PREDICTOR",
    "PREDICTOR_POOL",
    "SEED",
    "STRATEGY",
    "eval_batch",
]

STRATEGY = "evolution"
POPULATION = 50  # candidates per generation
GENERATIONS = 20
PARENTS = 10  # evolution: top candidates kept as parents
MUTATIONS = 25  # evolution: mutants per generation
CROSSOVERS = 25  # evolution: crossover children per generation
PREDICTOR = "gbr"  # predictor-evolution: the accuracy predictor (gbr | rf | mlp)
PREDICTOR_POOL = 10  # predictor-evolution: archs proposed (and predicted) per arch evaluated
SEED = 0
MAX_TRIES = 5000  # random draws per generation before giving up on finding new feasible archs
COST = "params"  # the cost of the Pareto front (and NSGA-II's second objective)
EVAL_BATCH = 256  # evaluation batch size on a GPU
# on a CPU: activations of 64 CIFAR images stay cache-sized; measured 51.5 vs 45.8 candidates/min at 256
# (benchmarks/search_throughput.py, docs/benchmarks.md)
EVAL_BATCH_CPU = 64
AMP = "off"  # scoring precision (see vitnas.precision): fp32 unless asked
HALVING_KEEP = 0.5  # successive halving: share of a generation's candidates scored on the whole split
LATENCY_BATCH = 1  # batch size at which latency is measured / predicted


def eval_batch(device) -> int:
    """The default evaluation batch on `device` (a torch.device or its name)."""
    return EVAL_BATCH_CPU if str(device).startswith("cpu") else EVAL_BATCH
