"""Do the fast ways of scoring candidates find what exact fp32 scoring finds? One JSON line.

1. bf16 vs fp32: the same random archs scored both ways on the supernet's validation split; Kendall tau
   of top-1 and of loss, and whether the best arch is the same.
2. Successive halving vs whole-split scoring: evolution with the same seed, once scoring every candidate
   on the whole split and once screening on a quarter and finishing the better half; the best arch each
   finds (its whole-split top-1), evaluations, and scoring time.

    .venv/bin/python benchmarks/scoring_agreement.py --checkpoint runs/cifar20/last.safetensors
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

from vitnas.data import AugmentConfig, load_data_of
from vitnas.models.spec import load_model
from vitnas.search import Constraints, Halving, build_strategy, run_search
from vitnas.search.evaluator import SupernetEvaluator


def timed(fn):
    seconds = [0.0]

    def inner(arch):
        t = time.perf_counter()
        try:
            return fn(arch)
        finally:
            seconds[0] += time.perf_counter() - t

    inner.seconds = seconds
    return inner


def search(space, evaluate, feasible, costs, constraints, seed, args, halving=None) -> dict:
    strategy = build_strategy(
        "evolution", space, feasible=feasible, seed=seed, population=args.population, generations=args.generations,
        parents=max(args.population // 4, 2), mutations=args.population // 2, crossovers=args.population // 2,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(
            strategy, evaluate, costs=costs, constraints=constraints, out_dir=Path(tmp), resume=False, halving=halving
        )
    # the best is always fully scored: its top1 is its whole-split score in both modes
    return {"best": r.best["key"], "best_top1": round(r.best["top1"], 2), "evaluations": r.evaluations}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained supernet checkpoint")
    p.add_argument("--archs", type=int, default=100, help="random archs scored in fp32 and bf16")
    p.add_argument("--seeds", type=int, default=3, help="search seeds for the halving comparison")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    net, meta = load_model(args.checkpoint)
    data = load_data_of(meta, source=args.checkpoint)
    space = net.space
    kw = dict(img_size=meta["img_size"], norm=AugmentConfig.from_dict(meta["norm"]))
    fp32 = SupernetEvaluator(net, data.val, **kw)
    bf16 = SupernetEvaluator(net, data.val, amp_dtype=torch.bfloat16, **kw)
    rng = np.random.default_rng(0)
    archs = list({a.key(): a for a in (space.sample(rng) for _ in range(args.archs * 2))}.values())[: args.archs]
    t = time.perf_counter()
    s32 = [fp32(a) for a in archs]
    t32 = time.perf_counter() - t
    t = time.perf_counter()
    s16 = [bf16(a) for a in archs]
    t16 = time.perf_counter() - t
    top32, top16 = np.array([s["top1"] for s in s32]), np.array([s["top1"] for s in s16])
    loss32, loss16 = np.array([s["loss"] for s in s32]), np.array([s["loss"] for s in s16])
    result = {
        "benchmark": "scoring_agreement",
        "checkpoint": args.checkpoint,
        "val_images": len(data.val),
        "archs": len(archs),
        "bf16_kendall_tau_top1": round(float(kendalltau(top32, top16).statistic), 3),
        "bf16_kendall_tau_loss": round(float(kendalltau(loss32, loss16).statistic), 3),
        "bf16_max_abs_top1_diff": round(float(np.abs(top32 - top16).max()), 2),
        "bf16_same_best": bool(np.argmax(top32) == np.argmax(top16)),
        "fp32_top1_range": [round(float(top32.min()), 2), round(float(top32.max()), 2)],
        "fp32_candidates_per_min": round(60 * len(archs) / t32, 1),
        "bf16_candidates_per_min": round(60 * len(archs) / t16, 1),
    }
    lo, hi = net.num_params(space.smallest()), net.num_params(space.largest())
    limit = (lo + hi) / 2
    constraints = Constraints.from_dict({"params": [None, limit]})
    costs = {"params": net.num_params, "macs": net.num_macs}

    def feasible(a):
        return net.num_params(a) <= limit

    full, halved = [], []
    for seed in range(args.seeds):
        ev = timed(fp32)
        r = search(space, ev, feasible, costs, constraints, seed, args)
        r["seconds"] = round(ev.seconds[0], 1)
        full.append(r)
        screen, finish = fp32.parts(0.25)
        s_ev, f_ev = timed(screen), timed(finish)
        r = search(space, None, feasible, costs, constraints, seed, args, Halving(s_ev, f_ev, len(screen), len(finish)))
        r["seconds"] = round(s_ev.seconds[0] + f_ev.seconds[0], 1)
        halved.append(r)
    result.update(params_limit=round(limit), search_full=full, search_halving=halved)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
