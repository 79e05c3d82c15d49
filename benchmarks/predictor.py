"""The accuracy predictor on a trained supernet: its Kendall tau on held-out candidates, and the
evaluations predictor-evolution needs to reach the best plain evolution finds. One JSON line.

    python benchmarks/predictor.py --checkpoint runs/bench-ranking/supernet-uniform-e20/last.safetensors

Candidates are scored with inherited weights on the supernet's held-out validation split (the data
and split are rebuilt from the checkpoint's metadata); scores are memoized across all runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitnas.data import AugmentConfig, load_data_of
from vitnas.models.spec import load_model
from vitnas.search import Constraints, build_strategy, run_search
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.search.predictor import PREDICTORS, AccuracyPredictor
from vitnas.search.ranking import rank_correlation


def first_reaching(rows: list[dict], target: float) -> int | None:
    return next((i + 1 for i, r in enumerate(rows) if r["top1"] >= target - 1e-9), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/bench-ranking/supernet-uniform-e20/last.safetensors")
    p.add_argument("--data", default=None, help="data folder, if not the checkpoint's data_path")
    p.add_argument("--fit", type=int, default=200, help="random candidates the predictor is fitted on")
    p.add_argument("--held-out", type=int, default=100, help="random candidates it is tested on")
    p.add_argument("--seeds", type=int, default=3, help="search seeds")
    p.add_argument("--population", type=int, default=16, help="candidates evaluated per generation")
    p.add_argument("--generations", type=int, default=8, help="generations per search")
    p.add_argument("--pool", type=int, default=10, help="predictor-evolution: proposals per evaluation")
    p.add_argument("--params-max", type=float, default=None, help="default: the middle of the space's range")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    supernet, meta = load_model(args.checkpoint)
    data = load_data_of(meta, data_path=args.data, source=args.checkpoint)
    norm = AugmentConfig.from_dict(meta["norm"])
    evaluator = SupernetEvaluator(supernet, data.val, img_size=meta["img_size"], norm=norm)
    space = supernet.space
    memo: dict[str, dict] = {}
    spent = [0.0]

    def evaluate(arch):
        if arch.key() not in memo:
            t = time.perf_counter()
            memo[arch.key()] = evaluator(arch)
            spent[0] += time.perf_counter() - t
        return memo[arch.key()]

    rng = np.random.default_rng(12345)
    pool = list({a.key(): a for a in (space.sample(rng) for _ in range(4 * (args.fit + args.held_out)))}.values())
    pool = pool[: args.fit + args.held_out]
    y = np.array([evaluate(a)["top1"] for a in pool])
    fit, test = slice(0, args.fit), slice(args.fit, None)
    params = np.array([supernet.num_params(a) for a in pool], dtype=float)
    predictor_tau = {
        kind: rank_correlation(AccuracyPredictor(space, kind).fit(pool[fit], y[fit]).predict(pool[test]), y[test])
        for kind in PREDICTORS
    }
    predictor_tau["params_only"] = rank_correlation(params[test], y[test])

    lo, hi = supernet.num_params(space.smallest()), supernet.num_params(space.largest())
    params_max = args.params_max or (lo + hi) / 2
    constraints = Constraints.from_dict({"params": [None, params_max]})
    runs: dict[str, list[dict]] = {"evolution": [], "predictor-evolution": [], "random": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in runs:
                strategy = build_strategy(
                    name, space, feasible=lambda a: supernet.num_params(a) <= params_max, seed=seed,
                    population=args.population, generations=args.generations, parents=max(args.population // 4, 2),
                    mutations=args.population // 2, crossovers=args.population // 2, pool=args.pool, predictor="gbr",
                )  # fmt: skip
                r = run_search(
                    strategy, evaluate, costs={"params": supernet.num_params}, constraints=constraints,
                    out_dir=Path(tmp) / f"{name}{seed}", resume=False,
                )  # fmt: skip
                runs[name].append({"best": r.best["top1"], "rows": r.candidates})
    reach = {}
    for name in ("predictor-evolution", "random"):
        reach[name] = [first_reaching(o["rows"], e["best"]) for o, e in zip(runs[name], runs["evolution"], strict=True)]
    reach["evolution"] = [first_reaching(e["rows"], e["best"]) for e in runs["evolution"]]
    out = {
        "benchmark": "predictor",
        "checkpoint": args.checkpoint,
        "val_images": len(data.val),
        "predictor_heldout": {
            k: {"kendall_tau": round(v["kendall_tau"], 3), "kendall_tau_ci": [round(x, 3) for x in v["kendall_tau_ci"]]}
            for k, v in predictor_tau.items()
        },  # fmt: skip
        "fit_candidates": args.fit,
        "heldout_candidates": len(pool) - args.fit,
        "params_max": params_max,
        "budget_per_search": args.population * args.generations,
        "best_val_top1": {k: [round(o["best"], 2) for o in v] for k, v in runs.items()},
        "evaluations_to_reach_evolution_best": reach,
        "unique_evaluations": len(memo),
        "candidates_per_minute": round(60 * len(memo) / spent[0], 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
