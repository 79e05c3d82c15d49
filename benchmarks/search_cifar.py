"""Search on a CIFAR-10 supernet: evolution vs random search at equal budget, the rank correlation of
inherited-weight accuracy with short standalone training, and search throughput. One JSON line.

    python benchmarks/search_cifar.py --checkpoint runs/bench_train_cifar/last.safetensors

The checkpoint is a `cifar` supernet trained by `benchmarks/train_cifar.py` (or `vitnas train-supernet`).
Candidates are ranked on the validation split held out from the training images; the test split is
not touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from vitnas.data import AugmentConfig, load_data
from vitnas.data.datasets import ImageData
from vitnas.search import Constraints, build_strategy, run_search
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.space.arch import ArchConfig
from vitnas.train import TrainConfig, Trainer, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="runs/bench_train_cifar/last.safetensors")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--params-max", type=float, default=None, help="default: the middle of the space's range")
    p.add_argument("--tau-archs", type=int, default=8)
    p.add_argument("--tau-epochs", type=int, default=2)
    p.add_argument("--tau-train-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).is_file():
        sys.exit(f"no supernet checkpoint at {args.checkpoint}; run benchmarks/train_cifar.py first")
    supernet, meta = load_model(args.checkpoint)
    cfg = meta["config"]
    data = load_data(cfg["data_path"], img_size=meta["img_size"], val_per_class=cfg["val_per_class"], seed=cfg["seed"])
    norm = AugmentConfig.from_dict(meta["norm"])
    space = supernet.space
    lo, hi = supernet.num_params(space.smallest()), supernet.num_params(space.largest())
    params_max = args.params_max or (lo + hi) / 2
    constraints = Constraints.from_dict({"params": [None, params_max]})
    costs = {"params": supernet.num_params, "macs": supernet.num_macs}
    evaluator = SupernetEvaluator(supernet, data.val, img_size=meta["img_size"], norm=norm)
    memo: dict[str, dict] = {}
    eval_seconds = [0.0]

    def evaluate(arch: ArchConfig) -> dict:
        if arch.key() not in memo:
            t = time.perf_counter()
            memo[arch.key()] = evaluator(arch)
            eval_seconds[0] += time.perf_counter() - t
        return memo[arch.key()]

    best: dict[str, list[float]] = {"evolution": [], "random": []}
    curves: dict[str, list[list[float]]] = {"evolution": [], "random": []}
    evo_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in best:
                strategy = build_strategy(
                    name,
                    space,
                    feasible=lambda a: supernet.num_params(a) <= params_max,
                    seed=seed,
                    population=args.population,
                    generations=args.generations,
                    parents=max(args.population // 4, 2),
                    mutations=args.population // 2,
                    crossovers=args.population // 2,
                )
                r = run_search(
                    strategy,
                    evaluate,
                    costs=costs,
                    constraints=constraints,
                    out_dir=Path(tmp) / f"{name}{seed}",
                    resume=False,
                )
                best[name].append(r.best["top1"])
                curves[name].append(r.best_per_generation)
                if name == "evolution" and seed == 0:
                    evo_rows = r.candidates
    # Kendall tau: archs spread over the inherited-accuracy range, each trained briefly from scratch.
    rows = sorted(evo_rows, key=lambda r: r["top1"])
    picks = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, args.tau_archs)]
    rng = np.random.default_rng(0)
    sub = data.train.subset(np.sort(rng.choice(len(data.train), args.tau_train_images, replace=False)))
    small = ImageData(data.name, data.classes, sub, data.val, data.test)
    standalone = []
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(picks):
            arch_path = Path(tmp) / f"arch{i}.yaml"
            ArchConfig.from_dict(row["arch"]).to_yaml(arch_path)
            tc = TrainConfig(
                **{
                    **cfg,
                    "task": "subnet",
                    "arch": str(arch_path),
                    "epochs": args.tau_epochs,
                    "warmup_epochs": 0.2,
                    "out_dir": str(Path(tmp) / f"run{i}"),
                    "init_from": None,
                    "ckpt_every": 10**6,
                }
            )
            trainer = Trainer(tc, data=small)
            trainer.fit()
            standalone.append(trainer.history[-1]["val_top1"])
    tau_seconds = time.perf_counter() - t
    tau = kendalltau([r["top1"] for r in picks], standalone)
    result = {
        "benchmark": "search_cifar",
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "params_max": params_max,
        "space_params_range": [lo, hi],
        "seeds": args.seeds,
        "budget_per_run": args.population * args.generations,
        "evolution_best_val_top1": [round(x, 2) for x in best["evolution"]],
        "random_best_val_top1": [round(x, 2) for x in best["random"]],
        "evolution_mean": round(float(np.mean(best["evolution"])), 2),
        "random_mean": round(float(np.mean(best["random"])), 2),
        "unique_evaluations": len(memo),
        "candidates_per_minute": round(60 * len(memo) / eval_seconds[0], 1),
        "kendall_tau": round(float(tau.statistic), 3),
        "kendall_p": round(float(tau.pvalue), 4),
        "tau_archs": [r["key"] for r in picks],
        "tau_inherited_top1": [round(r["top1"], 2) for r in picks],
        "tau_standalone_top1": [round(x, 2) for x in standalone],
        "tau_training": f"{args.tau_epochs} epochs on {args.tau_train_images} training images, from scratch",
        "tau_minutes": round(tau_seconds / 60, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
